package check

import (
	"bytes"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	"gopkg.in/yaml.v3"
)

const composePath = "../compose.yaml"

// composeFile covers the parts of the Compose specification deploy/compose.yaml
// uses. It is decoded with KnownFields, so a misspelt key (stop_grace_periode,
// depends_on.condtion) fails here instead of being ignored by Compose.
type composeFile struct {
	Name     string                    `yaml:"name"`
	Services map[string]composeService `yaml:"services"`
	Volumes  map[string]*composeVolume `yaml:"volumes"`

	// Extension fields holding YAML anchors that the services merge in.
	XTokenpipeEnv map[string]string `yaml:"x-tokenpipe-env"`
	XTokenpipe    composeService    `yaml:"x-tokenpipe"`
}

type composeVolume struct {
	Driver string `yaml:"driver"`
}

type composeService struct {
	Image           string                      `yaml:"image"`
	Build           *composeBuild               `yaml:"build"`
	Command         []string                    `yaml:"command"`
	Environment     map[string]string           `yaml:"environment"`
	ReadOnly        bool                        `yaml:"read_only"`
	Restart         string                      `yaml:"restart"`
	StopGracePeriod string                      `yaml:"stop_grace_period"`
	Healthcheck     *composeHealthcheck         `yaml:"healthcheck"`
	DependsOn       map[string]composeDependsOn `yaml:"depends_on"`
	Expose          []string                    `yaml:"expose"`
	Ports           []string                    `yaml:"ports"`
	Volumes         []string                    `yaml:"volumes"`
}

type composeBuild struct {
	Context    string `yaml:"context"`
	Dockerfile string `yaml:"dockerfile"`
	Target     string `yaml:"target"`
}

type composeHealthcheck struct {
	Test        []string `yaml:"test"`
	Interval    string   `yaml:"interval"`
	Timeout     string   `yaml:"timeout"`
	Retries     int      `yaml:"retries"`
	StartPeriod string   `yaml:"start_period"`
}

type composeDependsOn struct {
	Condition string `yaml:"condition"`
}

func loadCompose(t *testing.T) *composeFile {
	t.Helper()
	b, err := os.ReadFile(composePath)
	if err != nil {
		t.Fatal(err)
	}
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	var c composeFile
	if err := dec.Decode(&c); err != nil {
		t.Fatalf("%s: %v", composePath, err)
	}
	return &c
}

// TestComposeKnownFieldsRejectsTypos proves the decoder fails on a misspelt
// key, also inside a service that merges an anchor.
func TestComposeKnownFieldsRejectsTypos(t *testing.T) {
	doc := `
x-tokenpipe: &tp
  image: tokenpipe
services:
  a:
    <<: *tp
    stop_grace_periode: 30s
`
	dec := yaml.NewDecoder(strings.NewReader(doc))
	dec.KnownFields(true)
	var c composeFile
	if err := dec.Decode(&c); err == nil {
		t.Fatal("a misspelt key was accepted")
	}
}

func TestCompose(t *testing.T) {
	c := loadCompose(t)
	for _, name := range []string{"nats", "postgres", "migrate", "issuer-1", "issuer-2", "persister-1", "persister-2", "recovery", "nginx"} {
		if _, ok := c.Services[name]; !ok {
			t.Errorf("compose: no service %q", name)
		}
	}
	if t.Failed() {
		return
	}
	var names []string
	for n := range c.Services {
		names = append(names, n)
	}
	sort.Strings(names)

	roles := map[string]string{
		"issuer-1": "issuer", "issuer-2": "issuer",
		"persister-1": "persister", "persister-2": "persister",
		"recovery": "recovery",
	}
	dockerfile := readDockerfile(t)
	for _, name := range names {
		s := c.Services[name]
		where := "compose service " + name
		if s.Build != nil {
			df := filepath.Join(filepath.Dir(composePath), s.Build.Context, s.Build.Dockerfile)
			if _, err := os.Stat(df); err != nil {
				t.Errorf("%s: build dockerfile: %v", where, err)
			}
			if s.Build.Target != "" && !regexp.MustCompile(`(?im)^FROM\s+\S+\s+AS\s+`+regexp.QuoteMeta(s.Build.Target)+`\s*$`).MatchString(dockerfile) {
				t.Errorf("%s: build target %q is not a stage of the Dockerfile", where, s.Build.Target)
			}
		}
		if s.Image == "" && s.Build == nil {
			t.Errorf("%s: neither image nor build", where)
		}
		if s.StopGracePeriod != "" {
			goDuration(t, where+" stop_grace_period", s.StopGracePeriod)
		}
		if s.Healthcheck != nil {
			if len(s.Healthcheck.Test) < 2 || (s.Healthcheck.Test[0] != "CMD" && s.Healthcheck.Test[0] != "CMD-SHELL") {
				t.Errorf("%s: healthcheck test %q must start with CMD or CMD-SHELL", where, s.Healthcheck.Test)
			}
			for _, d := range []string{s.Healthcheck.Interval, s.Healthcheck.Timeout, s.Healthcheck.StartPeriod} {
				if d != "" {
					goDuration(t, where+" healthcheck", d)
				}
			}
		}
		for dep, cond := range s.DependsOn {
			if _, ok := c.Services[dep]; !ok {
				t.Errorf("%s: depends on unknown service %q", where, dep)
			}
			switch cond.Condition {
			case "service_started", "service_healthy", "service_completed_successfully":
			default:
				t.Errorf("%s: depends_on %s: condition %q", where, dep, cond.Condition)
			}
			if cond.Condition == "service_healthy" && c.Services[dep].Healthcheck == nil {
				t.Errorf("%s: waits for %s to be healthy, but %s has no healthcheck", where, dep, dep)
			}
		}
		if strings.HasPrefix(name, "issuer") || strings.HasPrefix(name, "persister") || name == "recovery" || name == "migrate" {
			var env []string
			for k := range s.Environment {
				env = append(env, k)
			}
			checkEnvNames(t, where, env)
		}

		role, isRole := roles[name]
		if !isRole {
			continue
		}
		if len(s.Command) == 0 || s.Command[0] != role {
			t.Errorf("%s: command %q, want role %q", where, s.Command, role)
		}
		if s.Healthcheck == nil || !strings.Contains(strings.Join(s.Healthcheck.Test, " "), "/readyz") {
			t.Errorf("%s: healthcheck must call /readyz", where)
		}
		shutdown := goDuration(t, where, setting(t, "TOKENPIPE_SHUTDOWN_TIMEOUT", s.Environment))
		if s.StopGracePeriod == "" {
			t.Errorf("%s: no stop_grace_period (Docker's default of 10s cuts the drain short)", where)
		} else if g := goDuration(t, where, s.StopGracePeriod); g < 30*time.Second || g <= shutdown {
			t.Errorf("%s: stop_grace_period %v must be at least 30s and exceed TOKENPIPE_SHUTDOWN_TIMEOUT %v", where, g, shutdown)
		}
		want := map[string]string{"nats": "service_healthy", "postgres": "service_healthy", "migrate": "service_completed_successfully"}
		for dep, cond := range want {
			if s.DependsOn[dep].Condition != cond {
				t.Errorf("%s: depends_on %s condition %q, want %q", where, dep, s.DependsOn[dep].Condition, cond)
			}
		}
		if s.Environment["TOKENPIPE_NATS_URL"] != "nats://nats:4222" || !strings.Contains(s.Environment["TOKENPIPE_DATABASE_URL"], "@postgres:5432/") {
			t.Errorf("%s: NATS and Postgres URLs must name the nats and postgres services", where)
		}
		if role == "persister" || role == "recovery" {
			w := atoi(t, where, setting(t, "TOKENPIPE_WORKERS", s.Environment))
			bs := atoi(t, where, setting(t, "TOKENPIPE_BATCH_SIZE", s.Environment))
			if m := atoi(t, where, setting(t, "TOKENPIPE_MAX_ACK_PENDING", s.Environment)); w*bs > m {
				t.Errorf("%s: WORKERS*BATCH_SIZE %d exceeds MAX_ACK_PENDING %d", where, w*bs, m)
			}
		}
	}

	mig := c.Services["migrate"]
	if strings.Join(mig.Command, " ") != "migrate up" || mig.DependsOn["postgres"].Condition != "service_healthy" {
		t.Errorf("compose: migrate must run `migrate up` after postgres is healthy")
	}
	if mig.Restart != "no" {
		t.Errorf("compose: migrate is one-shot; restart %q, want \"no\"", mig.Restart)
	}
	nats := c.Services["nats"]
	if !strings.HasPrefix(nats.Image, "nats:2.10") || !contains(nats.Command, "-js") || len(nats.Volumes) == 0 {
		t.Errorf("compose: nats must be nats:2.10 with -js and a volume (image %q, command %q)", nats.Image, nats.Command)
	}
	for _, v := range append(append([]string{}, nats.Volumes...), c.Services["postgres"].Volumes...) {
		if vol := strings.SplitN(v, ":", 2)[0]; !strings.HasPrefix(vol, ".") && !strings.HasPrefix(vol, "/") {
			if _, ok := c.Volumes[vol]; !ok {
				t.Errorf("compose: named volume %q is not declared under volumes", vol)
			}
		}
	}
	if pg := c.Services["postgres"]; !strings.HasPrefix(pg.Image, "postgres:15") {
		t.Errorf("compose: postgres image %q, want postgres:15", pg.Image)
	}

	// nginx: the one client port, balancing both issuers.
	ng := c.Services["nginx"]
	if !contains(ng.Ports, "8080:8080") {
		t.Errorf("compose: nginx must publish 8080:8080, has %q", ng.Ports)
	}
	var conf string
	for _, v := range ng.Volumes {
		parts := strings.Split(v, ":")
		if len(parts) >= 2 && strings.HasSuffix(parts[0], "nginx.conf") {
			b, err := os.ReadFile(filepath.Join(filepath.Dir(composePath), parts[0]))
			if err != nil {
				t.Fatalf("compose: nginx config: %v", err)
			}
			conf = string(b)
		}
	}
	if conf == "" {
		t.Fatal("compose: nginx mounts no nginx.conf")
	}
	for _, issuer := range []string{"issuer-1", "issuer-2"} {
		if !regexp.MustCompile(`(?m)^\s*server\s+` + issuer + `:8080\b`).MatchString(conf) {
			t.Errorf("nginx.conf: upstream has no server %s:8080", issuer)
		}
		if ng.DependsOn[issuer].Condition != "service_healthy" {
			t.Errorf("compose: nginx must wait for %s to be healthy", issuer)
		}
	}
	if !regexp.MustCompile(`(?m)^\s*listen\s+8080;`).MatchString(conf) || !strings.Contains(conf, "proxy_pass http://issuers;") {
		t.Error("nginx.conf: must listen on 8080 and proxy to the issuers upstream")
	}
	if strings.Count(conf, "{") != strings.Count(conf, "}") {
		t.Error("nginx.conf: unbalanced braces")
	}
}
