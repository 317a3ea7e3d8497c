package check

import (
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"
)

// repoRoot is the tokenpipe repository, two levels above this package.
const repoRoot = "../.."

// pendingEnv are variables the deployment files set for roles whose Go code
// is still being written (the issuer). Until a matching envconfig tag appears
// under internal/app they are reported, not failed; once the code exists,
// every TOKENPIPE_* variable the deploy files set must be declared there.
var pendingEnv = map[string]bool{
	"TOKENPIPE_HTTP_ADDR": true,
	"TOKENPIPE_MODE":      true,
	"TOKENPIPE_TOKEN_TTL": true,
}

var envconfigTag = regexp.MustCompile(`envconfig:"([A-Z0-9_]+)"(?:\s+default:"([^"]*)")?`)

// declaredEnv returns every TOKENPIPE_* variable declared by an envconfig tag
// in the tokenpipe command's sources, with the defaults the tags give it.
func declaredEnv(t *testing.T) map[string][]string {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(repoRoot, "internal", "app", "*.go"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no Go sources under internal/app (err %v)", err)
	}
	out := map[string][]string{}
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range envconfigTag.FindAllStringSubmatch(string(b), -1) {
			name := "TOKENPIPE_" + m[1]
			out[name] = append(out[name], m[2])
		}
	}
	if len(out) == 0 {
		t.Fatal("found no envconfig tags under internal/app")
	}
	return out
}

// goRuntimeEnv are the Go runtime's own variables a manifest may set.
var goRuntimeEnv = map[string]bool{"GOMEMLIMIT": true, "GOGC": true, "GOMAXPROCS": true}

// checkEnvNames fails on a TOKENPIPE_* variable the code does not declare
// (a typo silently falls back to the default) and on any other variable but
// the Go runtime's.
func checkEnvNames(t *testing.T, where string, names []string) {
	t.Helper()
	declared := declaredEnv(t)
	sort.Strings(names)
	for _, n := range names {
		switch {
		case goRuntimeEnv[n]:
		case !strings.HasPrefix(n, "TOKENPIPE_"):
			t.Errorf("%s: variable %s: tokenpipe reads only TOKENPIPE_* variables (and the Go runtime GOMEMLIMIT, GOGC, GOMAXPROCS)", where, n)
		case declared[n] != nil:
		case pendingEnv[n]:
			t.Logf("%s: %s is not declared in internal/app yet (issuer code pending)", where, n)
		default:
			t.Errorf("%s: %s is not a variable tokenpipe reads (no envconfig tag in internal/app)", where, n)
		}
	}
}

// goDuration parses a Go duration as the service would.
func goDuration(t *testing.T, where, s string) time.Duration {
	t.Helper()
	d, err := time.ParseDuration(s)
	if err != nil {
		t.Fatalf("%s: %q is not a Go duration: %v", where, s, err)
	}
	return d
}

// codeDefault is the default internal/app gives a variable, read from its
// envconfig tag, so these checks follow the code when a default changes.
func codeDefault(t *testing.T, name string) string {
	t.Helper()
	defs := declaredEnv(t)[name]
	if len(defs) == 0 {
		t.Fatalf("%s is not declared in internal/app", name)
	}
	for _, d := range defs[1:] {
		if d != defs[0] {
			t.Fatalf("%s has different defaults in internal/app: %q", name, defs)
		}
	}
	return defs[0]
}

// setting is a variable's value as a deployment sets it: the first of the
// given sources that has it, else the code's default.
func setting(t *testing.T, name string, sources ...map[string]string) string {
	t.Helper()
	for _, s := range sources {
		if v, ok := s[name]; ok {
			return v
		}
	}
	return codeDefault(t, name)
}

func atoi(t *testing.T, where, s string) int {
	t.Helper()
	n, err := strconv.Atoi(s)
	if err != nil {
		t.Fatalf("%s: %q is not an integer", where, s)
	}
	return n
}
