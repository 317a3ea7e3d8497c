package check

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"sort"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"
)

// The kustomizations CI builds. Directories under deploy/k8s/external are
// documentation for other tools (Helm, CloudNativePG) and are not built.
const (
	baseDir    = "../k8s/base"
	exampleDir = "../k8s/overlays/example"
)

// externalSecrets are Secrets the manifests may reference but that other
// software creates: CloudNativePG's app secret for the Cluster "tokenpipe-pg"
// (deploy/k8s/external/postgres-cluster.yaml), with the keys it always has.
var externalSecrets = map[string][]string{
	"tokenpipe-pg-app": {"uri", "username", "password", "host", "port", "dbname"},
}

// scaledObject covers the KEDA ScaledObject (keda.sh/v1alpha1) fields these
// manifests use. Decoding is strict, so a field outside this set fails until
// it is added here on purpose; trigger metadata values must be strings, as
// KEDA's CRD requires.
type scaledObject struct {
	APIVersion string            `json:"apiVersion"`
	Kind       string            `json:"kind"`
	Metadata   metav1.ObjectMeta `json:"metadata"`
	Spec       struct {
		ScaleTargetRef struct {
			APIVersion string `json:"apiVersion,omitempty"`
			Kind       string `json:"kind,omitempty"`
			Name       string `json:"name"`
		} `json:"scaleTargetRef"`
		PollingInterval *int32 `json:"pollingInterval,omitempty"`
		CooldownPeriod  *int32 `json:"cooldownPeriod,omitempty"`
		MinReplicaCount *int32 `json:"minReplicaCount,omitempty"`
		MaxReplicaCount *int32 `json:"maxReplicaCount,omitempty"`
		Advanced        *struct {
			HorizontalPodAutoscalerConfig *struct {
				Name     string                                         `json:"name,omitempty"`
				Behavior *autoscalingv2.HorizontalPodAutoscalerBehavior `json:"behavior,omitempty"`
			} `json:"horizontalPodAutoscalerConfig,omitempty"`
			RestoreToOriginalReplicaCount *bool `json:"restoreToOriginalReplicaCount,omitempty"`
		} `json:"advanced,omitempty"`
		Triggers []struct {
			Type              string            `json:"type"`
			Name              string            `json:"name,omitempty"`
			Metadata          map[string]string `json:"metadata"`
			AuthenticationRef *struct {
				Name string `json:"name"`
				Kind string `json:"kind,omitempty"`
			} `json:"authenticationRef,omitempty"`
		} `json:"triggers"`
	} `json:"spec"`
}

// built is one kustomize build, every object decoded into its type.
type built struct {
	dir           string
	ids           []string // kind/namespace/name of every object, in order
	namespaced    map[string]string
	deployments   map[string]*appsv1.Deployment
	services      map[string]*corev1.Service
	configMaps    map[string]*corev1.ConfigMap
	secrets       map[string]*corev1.Secret
	namespaces    map[string]*corev1.Namespace
	jobs          map[string]*batchv1.Job
	pdbs          map[string]*policyv1.PodDisruptionBudget
	hpas          map[string]*autoscalingv2.HorizontalPodAutoscaler
	scaledObjects map[string]*scaledObject
}

// decodeStrict decodes YAML into v the way the API server will see it: the
// YAML becomes JSON without looking at v (as kubectl sends it, so "2" stays a
// string and 2 a number), duplicate keys fail, and the JSON is decoded with
// unknown fields disallowed and types checked.
func decodeStrict(y []byte, v any) error {
	j, err := yaml.YAMLToJSONStrict(y)
	if err != nil {
		return err
	}
	dec := json.NewDecoder(bytes.NewReader(j))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if dec.More() {
		return fmt.Errorf("more than one document")
	}
	return nil
}

// kustomize runs the kustomize build of dir in-process and decodes every
// object strictly into its Kubernetes API type; an unknown kind fails.
func kustomize(t *testing.T, dir string) *built {
	t.Helper()
	k := krusty.MakeKustomizer(krusty.MakeDefaultOptions())
	rm, err := k.Run(filesys.MakeFsOnDisk(), dir)
	if err != nil {
		t.Fatalf("kustomize build %s: %v", dir, err)
	}
	b := &built{
		dir:           dir,
		namespaced:    map[string]string{},
		deployments:   map[string]*appsv1.Deployment{},
		services:      map[string]*corev1.Service{},
		configMaps:    map[string]*corev1.ConfigMap{},
		secrets:       map[string]*corev1.Secret{},
		namespaces:    map[string]*corev1.Namespace{},
		jobs:          map[string]*batchv1.Job{},
		pdbs:          map[string]*policyv1.PodDisruptionBudget{},
		hpas:          map[string]*autoscalingv2.HorizontalPodAutoscaler{},
		scaledObjects: map[string]*scaledObject{},
	}
	if rm.Size() == 0 {
		t.Fatalf("kustomize build %s: no objects", dir)
	}
	for _, r := range rm.Resources() {
		y, err := r.AsYAML()
		if err != nil {
			t.Fatalf("%s: %v", dir, err)
		}
		gvk := r.GetGvk()
		apiVersion, kind, name := gvk.ApiVersion(), gvk.Kind, r.GetName()
		id := fmt.Sprintf("%s %s/%s", apiVersion, kind, name)
		var obj any
		var objMeta *metav1.ObjectMeta
		var register func()
		switch apiVersion + " " + kind {
		case "apps/v1 Deployment":
			o := &appsv1.Deployment{}
			obj, objMeta, register = o, &o.ObjectMeta, func() { b.deployments[name] = o }
		case "v1 Service":
			o := &corev1.Service{}
			obj, objMeta, register = o, &o.ObjectMeta, func() { b.services[name] = o }
		case "v1 ConfigMap":
			o := &corev1.ConfigMap{}
			obj, objMeta, register = o, &o.ObjectMeta, func() { b.configMaps[name] = o }
		case "v1 Secret":
			o := &corev1.Secret{}
			obj, objMeta, register = o, &o.ObjectMeta, func() { b.secrets[name] = o }
		case "v1 Namespace":
			o := &corev1.Namespace{}
			obj, objMeta, register = o, &o.ObjectMeta, func() { b.namespaces[name] = o }
		case "batch/v1 Job":
			o := &batchv1.Job{}
			obj, objMeta, register = o, &o.ObjectMeta, func() { b.jobs[name] = o }
		case "policy/v1 PodDisruptionBudget":
			o := &policyv1.PodDisruptionBudget{}
			obj, objMeta, register = o, &o.ObjectMeta, func() { b.pdbs[name] = o }
		case "autoscaling/v2 HorizontalPodAutoscaler":
			o := &autoscalingv2.HorizontalPodAutoscaler{}
			obj, objMeta, register = o, &o.ObjectMeta, func() { b.hpas[name] = o }
		case "keda.sh/v1alpha1 ScaledObject":
			o := &scaledObject{}
			obj, objMeta, register = o, &o.Metadata, func() { b.scaledObjects[name] = o }
		default:
			t.Errorf("%s: %s: kind not known to this check; add its API type to kustomize() before using it", dir, id)
			continue
		}
		if err := decodeStrict(y, obj); err != nil {
			t.Errorf("%s: %s does not decode strictly: %v", dir, id, err)
			continue
		}
		register()
		if objMeta.Name == "" {
			t.Errorf("%s: %s has no metadata.name", dir, id)
		}
		b.ids = append(b.ids, id)
		if kind != "Namespace" {
			b.namespaced[id] = objMeta.Namespace
		}
	}
	return b
}

// TestStrictDecodingRejectsTypos proves the decoder used here fails on an
// unknown field (a misspelt probe) and on a wrongly typed value, so a green
// run means something.
func TestStrictDecodingRejectsTypos(t *testing.T) {
	bad := map[string]string{
		"misspelt field": `
apiVersion: apps/v1
kind: Deployment
metadata: {name: x}
spec:
  selector: {matchLabels: {a: b}}
  template:
    metadata: {labels: {a: b}}
    spec:
      containers:
        - name: c
          image: i
          readinesProbe: {httpGet: {path: /readyz, port: ops}}
`,
		"wrong type": `
apiVersion: apps/v1
kind: Deployment
metadata: {name: x}
spec:
  replicas: "two"
  selector: {matchLabels: {a: b}}
  template: {metadata: {labels: {a: b}}, spec: {containers: [{name: c, image: i}]}}
`,
		"duplicate key": `
apiVersion: v1
kind: ConfigMap
metadata: {name: x}
data: {A: "1", A: "2"}
`,
	}
	for name, doc := range bad {
		var d any = &appsv1.Deployment{}
		if strings.Contains(doc, "ConfigMap") {
			d = &corev1.ConfigMap{}
		}
		if err := decodeStrict([]byte(doc), d); err == nil {
			t.Errorf("%s: strict decoding accepted it", name)
		}
	}
	var so scaledObject
	if err := decodeStrict([]byte(`
apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata: {name: x}
spec:
  scaleTargetRef: {name: y}
  triggers: [{type: nats-jetstream, metadata: {lagThreshold: 5000}}]
`), &so); err == nil {
		t.Error("an unquoted number in KEDA trigger metadata was accepted; KEDA requires strings")
	}
}

func TestKustomizeBase(t *testing.T) {
	b := kustomize(t, baseDir)
	checkBuild(t, b)
}

func TestKustomizeExampleOverlay(t *testing.T) {
	b := kustomize(t, exampleDir)
	checkBuild(t, b)

	const ns = "tokenpipe"
	if _, ok := b.namespaces[ns]; !ok {
		t.Errorf("%s: no Namespace %q", b.dir, ns)
	}
	for id, got := range b.namespaced {
		if got != ns {
			t.Errorf("%s: %s is in namespace %q, want %q", b.dir, id, got, ns)
		}
	}
	cm := theConfigMap(t, b)
	if got := cm.Data["TOKENPIPE_STREAM_REPLICAS"]; got != "3" {
		t.Errorf("%s: TOKENPIPE_STREAM_REPLICAS = %q, want 3 (three NATS servers)", b.dir, got)
	}
	for _, d := range sortedDeployments(b) {
		for _, c := range allContainers(d.Spec.Template.Spec) {
			if strings.HasSuffix(c.Image, ":latest") || !strings.Contains(c.Image, ":") {
				t.Errorf("%s: Deployment %s container %s: image %q is not pinned to a tag", b.dir, d.Name, c.Name, c.Image)
			}
		}
	}
	if d := b.deployments["tokenpipe-recovery"]; d != nil && (d.Spec.Replicas == nil || *d.Spec.Replicas != 2) {
		t.Errorf("%s: recovery replicas = %v, want 2", b.dir, d.Spec.Replicas)
	}
	if h := b.hpas["tokenpipe-issuer"]; h != nil && (h.Spec.MinReplicas == nil || *h.Spec.MinReplicas != 3) {
		t.Errorf("%s: issuer HPA minReplicas = %v, want 3", b.dir, h.Spec.MinReplicas)
	}
	if so := b.scaledObjects["tokenpipe-persister"]; so != nil && (so.Spec.MinReplicaCount == nil || *so.Spec.MinReplicaCount != 2) {
		t.Errorf("%s: persister minReplicaCount = %v, want 2", b.dir, so.Spec.MinReplicaCount)
	}
}

// theConfigMap returns the generated tokenpipe-config ConfigMap.
func theConfigMap(t *testing.T, b *built) *corev1.ConfigMap {
	t.Helper()
	var found *corev1.ConfigMap
	for name, cm := range b.configMaps {
		if strings.HasPrefix(name, "tokenpipe-config") {
			if found != nil {
				t.Fatalf("%s: more than one tokenpipe-config ConfigMap", b.dir)
			}
			found = cm
		}
	}
	if found == nil {
		t.Fatalf("%s: no tokenpipe-config ConfigMap", b.dir)
	}
	return found
}

func sortedDeployments(b *built) []*appsv1.Deployment {
	var out []*appsv1.Deployment
	for _, d := range b.deployments {
		out = append(out, d)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

func allContainers(spec corev1.PodSpec) []corev1.Container {
	return append(append([]corev1.Container{}, spec.InitContainers...), spec.Containers...)
}

// checkBuild asserts what must hold in every build.
func checkBuild(t *testing.T, b *built) {
	t.Helper()
	for _, want := range []string{"tokenpipe-issuer", "tokenpipe-persister", "tokenpipe-recovery"} {
		if b.deployments[want] == nil {
			t.Errorf("%s: no Deployment %s", b.dir, want)
		}
	}
	if b.services["tokenpipe-issuer"] == nil {
		t.Errorf("%s: no Service tokenpipe-issuer", b.dir)
	}
	if b.jobs["tokenpipe-migrate"] == nil {
		t.Errorf("%s: no Job tokenpipe-migrate", b.dir)
	}
	if t.Failed() {
		return
	}
	theConfigMap(t, b)
	for _, d := range sortedDeployments(b) {
		checkDeployment(t, b, d)
	}
	checkMigrateJob(t, b, b.jobs["tokenpipe-migrate"])
	checkServices(t, b)
	checkPDBs(t, b)
	checkHPA(t, b)
	checkScaledObject(t, b)
}

// podEnv is the environment a container gets: envFrom sources in order, then
// env (which wins). Values from secretKeyRef and fieldRef are "".
func podEnv(t *testing.T, b *built, where string, c corev1.Container) map[string]string {
	t.Helper()
	env := map[string]string{}
	for _, src := range c.EnvFrom {
		switch {
		case src.ConfigMapRef != nil:
			cm := b.configMaps[src.ConfigMapRef.Name]
			if cm == nil {
				if src.ConfigMapRef.Optional == nil || !*src.ConfigMapRef.Optional {
					t.Errorf("%s: envFrom ConfigMap %q is not in the build", where, src.ConfigMapRef.Name)
				}
				continue
			}
			for k, v := range cm.Data {
				env[src.Prefix+k] = v
			}
		case src.SecretRef != nil:
			s := b.secrets[src.SecretRef.Name]
			if s == nil {
				if src.SecretRef.Optional == nil || !*src.SecretRef.Optional {
					t.Errorf("%s: envFrom Secret %q is not in the build", where, src.SecretRef.Name)
				}
				continue
			}
			for k, v := range s.StringData {
				env[src.Prefix+k] = v
			}
			for k, v := range s.Data {
				env[src.Prefix+k] = string(v)
			}
		default:
			t.Errorf("%s: envFrom entry with neither configMapRef nor secretRef", where)
		}
	}
	for _, e := range c.Env {
		env[e.Name] = e.Value
		if e.ValueFrom != nil && e.ValueFrom.SecretKeyRef != nil {
			ref := e.ValueFrom.SecretKeyRef
			if s := b.secrets[ref.Name]; s != nil {
				if _, ok := s.StringData[ref.Key]; !ok {
					if _, ok := s.Data[ref.Key]; !ok {
						t.Errorf("%s: env %s: Secret %s has no key %q", where, e.Name, ref.Name, ref.Key)
					}
				}
			} else if keys, ok := externalSecrets[ref.Name]; !ok || !contains(keys, ref.Key) {
				t.Errorf("%s: env %s: Secret %s key %q is neither in the build nor a known external Secret", where, e.Name, ref.Name, ref.Key)
			}
		}
	}
	var names []string
	for k := range env {
		names = append(names, k)
	}
	checkEnvNames(t, where, names)
	return env
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// checkSecurity asserts the pod and every container run as non-root, with a
// read-only root filesystem, no privilege escalation, no capabilities.
func checkSecurity(t *testing.T, where string, spec corev1.PodSpec) {
	t.Helper()
	podNonRoot := spec.SecurityContext != nil && spec.SecurityContext.RunAsNonRoot != nil && *spec.SecurityContext.RunAsNonRoot
	if spec.SecurityContext == nil || spec.SecurityContext.SeccompProfile == nil || spec.SecurityContext.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
		t.Errorf("%s: pod securityContext.seccompProfile is not RuntimeDefault", where)
	}
	if spec.AutomountServiceAccountToken == nil || *spec.AutomountServiceAccountToken {
		t.Errorf("%s: automountServiceAccountToken is not false (tokenpipe never calls the Kubernetes API)", where)
	}
	for _, c := range allContainers(spec) {
		cw := where + " container " + c.Name
		sc := c.SecurityContext
		if sc == nil {
			t.Errorf("%s: no securityContext", cw)
			continue
		}
		nonRoot := podNonRoot
		if sc.RunAsNonRoot != nil {
			nonRoot = *sc.RunAsNonRoot
		}
		if !nonRoot {
			t.Errorf("%s: runAsNonRoot is not true", cw)
		}
		if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
			t.Errorf("%s: readOnlyRootFilesystem is not true", cw)
		}
		if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
			t.Errorf("%s: allowPrivilegeEscalation is not false", cw)
		}
		if sc.Capabilities == nil || !contains(capNames(sc.Capabilities.Drop), "ALL") || len(sc.Capabilities.Add) > 0 {
			t.Errorf("%s: capabilities must drop ALL and add none", cw)
		}
		for _, r := range []corev1.ResourceName{corev1.ResourceCPU, corev1.ResourceMemory} {
			if q, ok := c.Resources.Requests[r]; !ok || q.IsZero() {
				t.Errorf("%s: no %s request", cw, r)
			}
		}
		if q, ok := c.Resources.Limits[corev1.ResourceMemory]; !ok || q.IsZero() {
			t.Errorf("%s: no memory limit", cw)
		}
		for r, req := range c.Resources.Requests {
			if lim, ok := c.Resources.Limits[r]; ok && lim.Cmp(req) < 0 {
				t.Errorf("%s: %s limit %s is below its request %s", cw, r, lim.String(), req.String())
			}
		}
		if c.Image == "" {
			t.Errorf("%s: no image", cw)
		}
	}
}

func capNames(cs []corev1.Capability) []string {
	var out []string
	for _, c := range cs {
		out = append(out, string(c))
	}
	return out
}

// portOf returns the port number in a Go listen address such as ":9090".
func portOf(t *testing.T, where, addr string) int32 {
	t.Helper()
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatalf("%s: listen address %q: %v", where, addr, err)
	}
	return int32(atoi(t, where, p))
}

func containerPort(c corev1.Container, name string) (int32, bool) {
	for _, p := range c.Ports {
		if p.Name == name {
			return p.ContainerPort, true
		}
	}
	return 0, false
}

func checkProbe(t *testing.T, where, kind string, p *corev1.Probe, path string, c corev1.Container) {
	t.Helper()
	if p == nil {
		t.Errorf("%s: no %s", where, kind)
		return
	}
	if p.HTTPGet == nil {
		t.Errorf("%s: %s is not an httpGet probe", where, kind)
		return
	}
	if p.HTTPGet.Path != path {
		t.Errorf("%s: %s path %q, want %q", where, kind, p.HTTPGet.Path, path)
	}
	if p.HTTPGet.Port.String() != "ops" {
		t.Errorf("%s: %s port %q, want the named port ops", where, kind, p.HTTPGet.Port.String())
	}
	if _, ok := containerPort(c, "ops"); !ok {
		t.Errorf("%s: %s uses port ops but the container has no port named ops", where, kind)
	}
}

// shutdownOf is TOKENPIPE_SHUTDOWN_TIMEOUT as the container sees it.
func shutdownOf(t *testing.T, where string, env map[string]string) time.Duration {
	t.Helper()
	return goDuration(t, where+" TOKENPIPE_SHUTDOWN_TIMEOUT", setting(t, "TOKENPIPE_SHUTDOWN_TIMEOUT", env))
}

func checkDeployment(t *testing.T, b *built, d *appsv1.Deployment) {
	t.Helper()
	where := fmt.Sprintf("%s: Deployment %s", b.dir, d.Name)
	spec := d.Spec.Template.Spec
	sel, err := metav1.LabelSelectorAsSelector(d.Spec.Selector)
	if err != nil || sel.Empty() {
		t.Errorf("%s: bad or empty selector: %v", where, err)
	} else if !sel.Matches(labels.Set(d.Spec.Template.Labels)) {
		t.Errorf("%s: selector %s does not match the pod template labels %v", where, sel, d.Spec.Template.Labels)
	}
	checkSecurity(t, where, spec)
	if len(spec.Containers) != 1 {
		t.Fatalf("%s: want exactly one container, got %d", where, len(spec.Containers))
	}
	c := spec.Containers[0]
	cw := where + " container " + c.Name
	if len(c.Args) == 0 {
		t.Fatalf("%s: no args: the role is the first argument", cw)
	}
	role := c.Args[0]
	switch role {
	case "issuer", "persister", "recovery":
	default:
		t.Errorf("%s: role %q is not issuer, persister or recovery", cw, role)
	}
	if got := d.Spec.Template.Labels["app.kubernetes.io/component"]; got != role {
		t.Errorf("%s: component label %q but role %q", where, got, role)
	}
	env := podEnv(t, b, cw, c)
	for _, ic := range spec.InitContainers {
		iw := where + " init container " + ic.Name
		podEnv(t, b, iw, ic)
		if strings.Join(ic.Args, " ") != "migrate up" {
			t.Errorf("%s: args %q: the only init container is `migrate up`", iw, ic.Args)
		}
	}

	checkProbe(t, cw, "readinessProbe", c.ReadinessProbe, "/readyz", c)
	checkProbe(t, cw, "livenessProbe", c.LivenessProbe, "/healthz", c)
	if c.StartupProbe != nil {
		checkProbe(t, cw, "startupProbe", c.StartupProbe, "/healthz", c)
	}
	opsPort, ok := containerPort(c, "ops")
	if want := portOf(t, cw, setting(t, "TOKENPIPE_OPS_ADDR", env)); !ok || opsPort != want {
		t.Errorf("%s: port ops = %d, but TOKENPIPE_OPS_ADDR listens on %d", cw, opsPort, want)
	}
	if role == "issuer" {
		httpPort, ok := containerPort(c, "http")
		addr, set := env["TOKENPIPE_HTTP_ADDR"]
		if !set {
			addr = ":8080" // the issuer's documented default
		}
		if want := portOf(t, cw, addr); !ok || httpPort != want {
			t.Errorf("%s: port http = %d, but TOKENPIPE_HTTP_ADDR listens on %d", cw, httpPort, want)
		}
	}

	// Graceful drain: SIGTERM comes after any preStop sleep, and the drain
	// may take TOKENPIPE_SHUTDOWN_TIMEOUT; SIGKILL must come after both.
	shutdown := shutdownOf(t, cw, env)
	var preStop time.Duration
	if c.Lifecycle != nil && c.Lifecycle.PreStop != nil {
		switch {
		case c.Lifecycle.PreStop.Sleep != nil:
			preStop = time.Duration(c.Lifecycle.PreStop.Sleep.Seconds) * time.Second
		case c.Lifecycle.PreStop.Exec != nil:
			t.Errorf("%s: preStop exec: the image is distroless (no shell, no sleep binary); use the sleep action", cw)
		}
	}
	if role == "issuer" && preStop <= 0 {
		t.Errorf("%s: the issuer needs a preStop sleep so endpoints update before its listener closes", cw)
	}
	grace := time.Duration(30) * time.Second
	if spec.TerminationGracePeriodSeconds != nil {
		grace = time.Duration(*spec.TerminationGracePeriodSeconds) * time.Second
	}
	if grace <= preStop+shutdown {
		t.Errorf("%s: terminationGracePeriodSeconds %v must exceed preStop %v + TOKENPIPE_SHUTDOWN_TIMEOUT %v", where, grace, preStop, shutdown)
	}
	if role == "persister" || role == "recovery" {
		w := atoi(t, cw, setting(t, "TOKENPIPE_WORKERS", env))
		bs := atoi(t, cw, setting(t, "TOKENPIPE_BATCH_SIZE", env))
		if maxAck := atoi(t, cw, setting(t, "TOKENPIPE_MAX_ACK_PENDING", env)); w*bs > maxAck {
			t.Errorf("%s: WORKERS*BATCH_SIZE = %d exceeds MAX_ACK_PENDING %d (the role refuses to start)", cw, w*bs, maxAck)
		}
	}
	for _, v := range spec.Volumes {
		if v.Secret != nil && b.secrets[v.Secret.SecretName] == nil && (v.Secret.Optional == nil || !*v.Secret.Optional) {
			t.Errorf("%s: volume %s: Secret %q is not in the build and not optional", where, v.Name, v.Secret.SecretName)
		}
	}
}

func checkMigrateJob(t *testing.T, b *built, j *batchv1.Job) {
	t.Helper()
	where := fmt.Sprintf("%s: Job %s", b.dir, j.Name)
	spec := j.Spec.Template.Spec
	checkSecurity(t, where, spec)
	if j.Spec.BackoffLimit == nil {
		t.Errorf("%s: no backoffLimit", where)
	}
	if j.Spec.TTLSecondsAfterFinished == nil {
		t.Errorf("%s: no ttlSecondsAfterFinished (a finished Job blocks re-applying a new image)", where)
	}
	if spec.RestartPolicy != corev1.RestartPolicyNever && spec.RestartPolicy != corev1.RestartPolicyOnFailure {
		t.Errorf("%s: restartPolicy %q", where, spec.RestartPolicy)
	}
	if len(spec.Containers) != 1 || strings.Join(spec.Containers[0].Args, " ") != "migrate up" {
		t.Errorf("%s: want one container running `migrate up`", where)
		return
	}
	podEnv(t, b, where, spec.Containers[0])
}

// podsMatching returns the Deployments whose pod labels a selector matches.
func podsMatching(b *built, selector map[string]string) []*appsv1.Deployment {
	var out []*appsv1.Deployment
	for _, d := range sortedDeployments(b) {
		match := len(selector) > 0
		for k, v := range selector {
			if d.Spec.Template.Labels[k] != v {
				match = false
			}
		}
		if match {
			out = append(out, d)
		}
	}
	return out
}

func checkServices(t *testing.T, b *built) {
	t.Helper()
	for name, s := range b.services {
		where := fmt.Sprintf("%s: Service %s", b.dir, name)
		targets := podsMatching(b, s.Spec.Selector)
		if len(targets) == 0 {
			t.Errorf("%s: selector %v matches no Deployment's pods", where, s.Spec.Selector)
			continue
		}
		for _, p := range s.Spec.Ports {
			if p.TargetPort.String() == "" || p.TargetPort.String() == "0" {
				continue
			}
			for _, d := range targets {
				if _, ok := containerPort(d.Spec.Template.Spec.Containers[0], p.TargetPort.String()); !ok && p.TargetPort.IntValue() == 0 {
					t.Errorf("%s: port %s targets %q, which Deployment %s's container does not name", where, p.Name, p.TargetPort.String(), d.Name)
				}
			}
		}
	}
	issuer := b.services["tokenpipe-issuer"]
	if len(issuer.Spec.Ports) == 0 || issuer.Spec.Ports[0].Port != 80 || issuer.Spec.Ports[0].TargetPort.String() != "http" {
		t.Errorf("%s: Service tokenpipe-issuer must map port 80 to the container port http (8080)", b.dir)
	}
	var headless bool
	for _, s := range b.services {
		if s.Spec.ClusterIP == corev1.ClusterIPNone {
			for _, p := range s.Spec.Ports {
				if p.Name == "ops" && p.Port == 9090 {
					headless = true
				}
			}
		}
	}
	if !headless {
		t.Errorf("%s: no headless Service with the ops (metrics) port 9090", b.dir)
	}
}

func checkPDBs(t *testing.T, b *built) {
	t.Helper()
	want := map[string]string{"issuer": "minAvailable=1", "persister": "maxUnavailable=1"}
	got := map[string]string{}
	for name, p := range b.pdbs {
		where := fmt.Sprintf("%s: PodDisruptionBudget %s", b.dir, name)
		if p.Spec.Selector == nil {
			t.Errorf("%s: no selector", where)
			continue
		}
		targets := podsMatching(b, p.Spec.Selector.MatchLabels)
		if len(targets) != 1 {
			t.Errorf("%s: selector matches %d Deployments, want 1", where, len(targets))
			continue
		}
		role := targets[0].Spec.Template.Labels["app.kubernetes.io/component"]
		switch {
		case p.Spec.MinAvailable != nil:
			got[role] = "minAvailable=" + p.Spec.MinAvailable.String()
		case p.Spec.MaxUnavailable != nil:
			got[role] = "maxUnavailable=" + p.Spec.MaxUnavailable.String()
		}
	}
	for role, w := range want {
		if got[role] != w {
			t.Errorf("%s: %s PodDisruptionBudget %q, want %q", b.dir, role, got[role], w)
		}
	}
}

func checkHPA(t *testing.T, b *built) {
	t.Helper()
	h := b.hpas["tokenpipe-issuer"]
	if h == nil {
		t.Errorf("%s: no HorizontalPodAutoscaler tokenpipe-issuer", b.dir)
		return
	}
	where := fmt.Sprintf("%s: HorizontalPodAutoscaler %s", b.dir, h.Name)
	ref := h.Spec.ScaleTargetRef
	d := b.deployments[ref.Name]
	if ref.Kind != "Deployment" || ref.APIVersion != "apps/v1" || d == nil {
		t.Errorf("%s: target %s %s/%s is not a Deployment in the build", where, ref.APIVersion, ref.Kind, ref.Name)
		return
	}
	if d.Spec.Replicas != nil {
		t.Errorf("%s: Deployment %s sets replicas; the autoscaler owns the count", where, d.Name)
	}
	if h.Spec.MinReplicas == nil || *h.Spec.MinReplicas < 2 || *h.Spec.MinReplicas > h.Spec.MaxReplicas {
		t.Errorf("%s: minReplicas %v must be at least 2 (PDB minAvailable 1) and at most maxReplicas %d", where, h.Spec.MinReplicas, h.Spec.MaxReplicas)
	}
	var cpu bool
	for _, m := range h.Spec.Metrics {
		if m.Type == autoscalingv2.ResourceMetricSourceType && m.Resource != nil && m.Resource.Name == corev1.ResourceCPU &&
			m.Resource.Target.Type == autoscalingv2.UtilizationMetricType && m.Resource.Target.AverageUtilization != nil {
			cpu = *m.Resource.Target.AverageUtilization == 70
		}
	}
	if !cpu {
		t.Errorf("%s: want a CPU averageUtilization 70 metric", where)
	}
	if _, ok := d.Spec.Template.Spec.Containers[0].Resources.Requests[corev1.ResourceCPU]; !ok {
		t.Errorf("%s: CPU utilization needs a CPU request on %s", where, d.Name)
	}
}

func checkScaledObject(t *testing.T, b *built) {
	t.Helper()
	so := b.scaledObjects["tokenpipe-persister"]
	if so == nil {
		t.Errorf("%s: no ScaledObject tokenpipe-persister", b.dir)
		return
	}
	where := fmt.Sprintf("%s: ScaledObject %s", b.dir, so.Metadata.Name)
	if so.APIVersion != "keda.sh/v1alpha1" || so.Kind != "ScaledObject" {
		t.Errorf("%s: apiVersion/kind %s/%s", where, so.APIVersion, so.Kind)
	}
	d := b.deployments[so.Spec.ScaleTargetRef.Name]
	if d == nil || (so.Spec.ScaleTargetRef.Kind != "" && so.Spec.ScaleTargetRef.Kind != "Deployment") {
		t.Errorf("%s: scaleTargetRef %q is not a Deployment in the build", where, so.Spec.ScaleTargetRef.Name)
		return
	}
	if d.Spec.Replicas != nil {
		t.Errorf("%s: Deployment %s sets replicas; KEDA owns the count", where, d.Name)
	}
	if so.Spec.MinReplicaCount == nil || *so.Spec.MinReplicaCount < 1 {
		t.Errorf("%s: minReplicaCount must be at least 1", where)
	}
	if so.Spec.MaxReplicaCount == nil || (so.Spec.MinReplicaCount != nil && *so.Spec.MaxReplicaCount < *so.Spec.MinReplicaCount) {
		t.Errorf("%s: maxReplicaCount must be set and >= minReplicaCount", where)
		return
	}
	if len(so.Spec.Triggers) != 1 {
		t.Fatalf("%s: want one trigger, got %d", where, len(so.Spec.Triggers))
	}
	tr := so.Spec.Triggers[0]
	if tr.Type != "nats-jetstream" {
		t.Errorf("%s: trigger type %q, want nats-jetstream", where, tr.Type)
	}
	for _, k := range []string{"natsServerMonitoringEndpoint", "account", "stream", "consumer", "lagThreshold"} {
		if tr.Metadata[k] == "" {
			t.Errorf("%s: trigger metadata %s is empty", where, k)
		}
	}
	known := map[string]bool{"natsServerMonitoringEndpoint": true, "account": true, "stream": true, "consumer": true,
		"lagThreshold": true, "activationLagThreshold": true, "useHttps": true}
	for k := range tr.Metadata {
		if !known[k] {
			t.Errorf("%s: trigger metadata %q is not a nats-jetstream parameter", where, k)
		}
	}
	if _, _, err := net.SplitHostPort(tr.Metadata["natsServerMonitoringEndpoint"]); err != nil {
		t.Errorf("%s: natsServerMonitoringEndpoint %q is not host:port: %v", where, tr.Metadata["natsServerMonitoringEndpoint"], err)
	}

	// The trigger must name the stream and consumer the persisters use: for
	// an unknown consumer KEDA reports the whole stream as lag.
	c := d.Spec.Template.Spec.Containers[0]
	env := podEnv(t, b, where+" target container", c)
	if want := setting(t, "TOKENPIPE_STREAM", env); tr.Metadata["stream"] != want {
		t.Errorf("%s: stream %q, but the persisters use TOKENPIPE_STREAM=%q", where, tr.Metadata["stream"], want)
	}
	if want := setting(t, "TOKENPIPE_PERSISTER_CONSUMER", env); tr.Metadata["consumer"] != want {
		t.Errorf("%s: consumer %q, but the persisters use TOKENPIPE_PERSISTER_CONSUMER=%q", where, tr.Metadata["consumer"], want)
	}
	lag := atoi(t, where+" lagThreshold", tr.Metadata["lagThreshold"])
	if v, ok := tr.Metadata["activationLagThreshold"]; ok {
		atoi(t, where+" activationLagThreshold", v)
	}
	perPod := atoi(t, where, setting(t, "TOKENPIPE_WORKERS", env)) * atoi(t, where, setting(t, "TOKENPIPE_BATCH_SIZE", env))
	maxAck := atoi(t, where, setting(t, "TOKENPIPE_MAX_ACK_PENDING", env))
	if lag <= perPod {
		t.Errorf("%s: lagThreshold %d must exceed WORKERS*BATCH_SIZE %d: in-flight events count as lag", where, lag, perPod)
	}
	if limit := maxAck / perPod; int(*so.Spec.MaxReplicaCount) > limit {
		t.Errorf("%s: maxReplicaCount %d exceeds MAX_ACK_PENDING/(WORKERS*BATCH_SIZE) = %d; the extra pods would idle", where, *so.Spec.MaxReplicaCount, limit)
	}
}
