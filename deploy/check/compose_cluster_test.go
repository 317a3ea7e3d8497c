package check

import (
	"bytes"
	"maps"
	"os"
	"slices"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"
)

const clusterOverlayPath = "../compose.nats-cluster.yaml"

// clusterOverlay is compose.nats-cluster.yaml, decoded strictly like
// compose.yaml.
type clusterOverlay struct {
	Services     map[string]composeService `yaml:"services"`
	Volumes      map[string]*composeVolume `yaml:"volumes"`
	XNATSCluster composeService            `yaml:"x-nats-cluster"`
	XClusterEnv  map[string]string         `yaml:"x-cluster-env"`
}

// TestComposeNATSClusterOverlay checks the overlay that turns compose.yaml's
// single NATS server into a three-server cluster: every server routes to all
// three under one cluster name with its own name and volume, and every role
// lists all three servers and makes the stream with replicas 3.
func TestComposeNATSClusterOverlay(t *testing.T) {
	b, err := os.ReadFile(clusterOverlayPath)
	if err != nil {
		t.Fatal(err)
	}
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	var o clusterOverlay
	if err := dec.Decode(&o); err != nil {
		t.Fatalf("%s: %v", clusterOverlayPath, err)
	}
	base := loadCompose(t)

	servers := []string{"nats", "nats-1", "nats-2"}
	var routes []string
	for _, s := range servers {
		routes = append(routes, "nats://"+s+":6222")
	}
	names := map[string]bool{}
	for _, s := range servers {
		svc, ok := o.Services[s]
		if !ok {
			t.Fatalf("overlay: no service %q", s)
		}
		flags := flagValues(svc.Command)
		if !contains(svc.Command, "-js") || flags["--cluster_name"] != "tokenpipe" || flags["--cluster"] != "nats://0.0.0.0:6222" {
			t.Errorf("overlay %s: needs -js, --cluster_name tokenpipe and --cluster nats://0.0.0.0:6222: %q", s, svc.Command)
		}
		if got := strings.Split(flags["--routes"], ","); !slices.Equal(got, routes) {
			t.Errorf("overlay %s: routes %q, want %q", s, got, routes)
		}
		if n := flags["--name"]; n == "" || names[n] {
			t.Errorf("overlay %s: server name %q missing or not unique", s, n)
		} else {
			names[n] = true
		}
		if len(svc.Volumes) != 1 {
			t.Fatalf("overlay %s: want one data volume, has %q", s, svc.Volumes)
		}
		vol := strings.SplitN(svc.Volumes[0], ":", 2)[0]
		_, inOverlay := o.Volumes[vol]
		_, inBase := base.Volumes[vol]
		if !inOverlay && !inBase {
			t.Errorf("overlay %s: volume %q is declared in neither file", s, vol)
		}
	}
	if !strings.HasPrefix(o.XNATSCluster.Image, "nats:2.10") || o.XNATSCluster.Healthcheck == nil {
		t.Errorf("overlay: servers must use nats:2.10 with a healthcheck")
	}

	wantURL := "nats://nats:4222,nats://nats-1:4222,nats://nats-2:4222"
	for name, svc := range base.Services {
		if len(svc.Command) == 0 || !slices.Contains([]string{"issuer", "persister", "recovery"}, svc.Command[0]) {
			continue
		}
		env := o.Services[name].Environment
		if env["TOKENPIPE_NATS_URL"] != wantURL || env["TOKENPIPE_STREAM_REPLICAS"] != "3" {
			t.Errorf("overlay %s: TOKENPIPE_NATS_URL %q and TOKENPIPE_STREAM_REPLICAS %q, want %q and 3",
				name, env["TOKENPIPE_NATS_URL"], env["TOKENPIPE_STREAM_REPLICAS"], wantURL)
		}
		checkEnvNames(t, "overlay "+name, slices.Collect(maps.Keys(env)))
	}
}

// flagValues maps each "--flag" in a command to the argument after it.
func flagValues(cmd []string) map[string]string {
	m := map[string]string{}
	for i := 0; i+1 < len(cmd); i++ {
		if strings.HasPrefix(cmd[i], "--") {
			m[cmd[i]] = cmd[i+1]
		}
	}
	return m
}
