package check

import (
	"bytes"
	"os"
	"testing"

	"gopkg.in/yaml.v3"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
)

// The files under deploy/k8s/external are inputs for other tools (the NATS
// Helm chart, the CloudNativePG operator), not part of the kustomize build.
// This checks they parse and agree with what the manifests expect of them.

// cnpgCluster covers the CloudNativePG Cluster fields the example uses.
type cnpgCluster struct {
	APIVersion string `yaml:"apiVersion"`
	Kind       string `yaml:"kind"`
	Metadata   struct {
		Name      string `yaml:"name"`
		Namespace string `yaml:"namespace"`
	} `yaml:"metadata"`
	Spec struct {
		Instances             int    `yaml:"instances"`
		ImageName             string `yaml:"imageName"`
		PrimaryUpdateStrategy string `yaml:"primaryUpdateStrategy"`
		Bootstrap             struct {
			Initdb struct {
				Database string `yaml:"database"`
				Owner    string `yaml:"owner"`
			} `yaml:"initdb"`
		} `yaml:"bootstrap"`
		PostgreSQL struct {
			Parameters  map[string]string `yaml:"parameters"`
			Synchronous *struct {
				Method         string `yaml:"method"`
				Number         int    `yaml:"number"`
				DataDurability string `yaml:"dataDurability"`
			} `yaml:"synchronous"`
		} `yaml:"postgresql"`
		Storage struct {
			Size string `yaml:"size"`
		} `yaml:"storage"`
		Resources struct {
			Requests map[string]string `yaml:"requests"`
			Limits   map[string]string `yaml:"limits"`
		} `yaml:"resources"`
	} `yaml:"spec"`
}

func TestExternalPostgresCluster(t *testing.T) {
	b, err := os.ReadFile("../k8s/external/postgres-cluster.yaml")
	if err != nil {
		t.Fatal(err)
	}
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	var c cnpgCluster
	if err := dec.Decode(&c); err != nil {
		t.Fatalf("postgres-cluster.yaml: %v", err)
	}
	if c.APIVersion != "postgresql.cnpg.io/v1" || c.Kind != "Cluster" {
		t.Errorf("postgres-cluster.yaml: %s %s, want postgresql.cnpg.io/v1 Cluster", c.APIVersion, c.Kind)
	}
	if c.Spec.Instances < 2 {
		t.Errorf("postgres-cluster.yaml: %d instances; want a standby", c.Spec.Instances)
	}
	// The operator names the app secret <cluster>-app; the overlay reads it.
	app := c.Metadata.Name + "-app"
	if _, ok := externalSecrets[app]; !ok {
		t.Errorf("the overlay expects CloudNativePG's secret among %v, but the Cluster %q creates %q", keys(externalSecrets), c.Metadata.Name, app)
	}
	ov := kustomize(t, exampleDir)
	for id, ns := range ov.namespaced {
		if ns != c.Metadata.Namespace {
			t.Errorf("%s is in namespace %q but the Cluster (and its secret) in %q", id, ns, c.Metadata.Namespace)
			break
		}
	}
	// Asynchronous replication loses acknowledged rows in a failover (README
	// "Operating: failover"); the example must not.
	if sy := c.Spec.PostgreSQL.Synchronous; sy == nil || sy.Number < 1 || sy.DataDurability != "required" {
		t.Errorf("postgres-cluster.yaml: want synchronous replication with at least one standby and dataDurability: required")
	}
	if c.Spec.Bootstrap.Initdb.Database != "tokenpipe" {
		t.Errorf("postgres-cluster.yaml: database %q, want tokenpipe", c.Spec.Bootstrap.Initdb.Database)
	}
}

func TestExternalNATSValues(t *testing.T) {
	b, err := os.ReadFile("../k8s/external/nats-values.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var v struct {
		Config struct {
			Cluster struct {
				Enabled  bool `yaml:"enabled"`
				Replicas int  `yaml:"replicas"`
			} `yaml:"cluster"`
			JetStream struct {
				Enabled   bool `yaml:"enabled"`
				FileStore struct {
					Enabled bool `yaml:"enabled"`
				} `yaml:"fileStore"`
			} `yaml:"jetstream"`
			Monitor struct {
				Enabled bool `yaml:"enabled"`
				Port    int  `yaml:"port"`
			} `yaml:"monitor"`
		} `yaml:"config"`
	}
	if err := yaml.Unmarshal(b, &v); err != nil {
		t.Fatalf("nats-values.yaml: %v", err)
	}
	if !v.Config.Cluster.Enabled || v.Config.Cluster.Replicas != 3 {
		t.Error("nats-values.yaml: want a 3-server cluster")
	}
	if !v.Config.JetStream.Enabled || !v.Config.JetStream.FileStore.Enabled {
		t.Error("nats-values.yaml: want JetStream on file storage")
	}
	if !v.Config.Monitor.Enabled || v.Config.Monitor.Port != 8222 {
		t.Error("nats-values.yaml: the monitor port 8222 must be on (KEDA reads /jsz)")
	}
	so := kustomize(t, baseDir).scaledObjects["tokenpipe-persister"]
	if so == nil || len(so.Spec.Triggers) == 0 {
		t.Fatal("no persister ScaledObject")
	}
	if ep := so.Spec.Triggers[0].Metadata["natsServerMonitoringEndpoint"]; ep != "nats-headless.nats.svc.cluster.local:8222" {
		t.Logf("KEDA endpoint %q: with the chart's cluster mode it must be the headless Service", ep)
	}
}

func keys(m map[string][]string) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

// TestExternalReplayJob checks the re-drive Job of the failover runbook: it
// decodes strictly as a Job, is as locked down as the roles, runs `replay
// --since`, and repeats the overlay's settings, image and database secret
// exactly (it cannot read the overlay's ConfigMap, whose name has a hash).
func TestExternalReplayJob(t *testing.T) {
	b, err := os.ReadFile("../k8s/external/replay-after-failover.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var j batchv1.Job
	if err := decodeStrict(b, &j); err != nil {
		t.Fatalf("replay-after-failover.yaml: %v", err)
	}
	where := "replay-after-failover.yaml"
	spec := j.Spec.Template.Spec
	checkSecurity(t, where, spec)
	if spec.RestartPolicy != corev1.RestartPolicyNever || j.Spec.BackoffLimit == nil || j.Spec.ActiveDeadlineSeconds == nil {
		t.Errorf("%s: want restartPolicy Never, a backoffLimit and an activeDeadlineSeconds", where)
	}
	if len(spec.Containers) != 1 {
		t.Fatalf("%s: want one container", where)
	}
	c := spec.Containers[0]
	if len(c.Args) < 3 || c.Args[0] != "replay" || c.Args[1] != "--since" || c.Args[2] != "SAFE_POINT" {
		t.Errorf("%s: args %v, want replay --since SAFE_POINT ...", where, c.Args)
	}

	ov := kustomize(t, exampleDir)
	if ns := ov.namespaced["batch/v1 Job/tokenpipe-migrate"]; j.Namespace != ns {
		t.Errorf("%s: namespace %q, the overlay's is %q", where, j.Namespace, ns)
	}
	if m := ov.jobs["tokenpipe-migrate"]; m == nil || m.Spec.Template.Spec.Containers[0].Image != c.Image {
		t.Errorf("%s: image %q differs from the overlay's", where, c.Image)
	}
	cm := theConfigMap(t, ov)
	env := map[string]string{}
	for _, e := range c.Env {
		switch {
		case e.ValueFrom != nil && e.ValueFrom.SecretKeyRef != nil:
			ref := e.ValueFrom.SecretKeyRef
			if e.Name != "TOKENPIPE_DATABASE_URL" || ref.Name != "tokenpipe-pg-app" || ref.Key != "uri" {
				t.Errorf("%s: %s from secret %s/%s; want TOKENPIPE_DATABASE_URL from tokenpipe-pg-app/uri", where, e.Name, ref.Name, ref.Key)
			}
		default:
			env[e.Name] = e.Value
		}
	}
	checkEnvNames(t, where, keysOf(env))
	for _, name := range []string{"TOKENPIPE_NATS_URL", "TOKENPIPE_STREAM", "TOKENPIPE_SUBJECT_PREFIX"} {
		if env[name] != cm.Data[name] {
			t.Errorf("%s: %s=%q but the overlay has %q", where, name, env[name], cm.Data[name])
		}
	}
	if len(c.EnvFrom) != 1 || c.EnvFrom[0].SecretRef == nil || c.EnvFrom[0].SecretRef.Name != "tokenpipe-secrets" {
		t.Errorf("%s: want envFrom the secret tokenpipe-secrets (NATS credentials)", where)
	}
}

func keysOf(m map[string]string) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}
