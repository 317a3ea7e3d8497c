package check

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

const dockerfilePath = "../Dockerfile"

func readDockerfile(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile(dockerfilePath)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestDockerfile checks by inspection what no container engine here can
// build: the Go version follows go.mod, the binary is static and stripped,
// and the default (last) stage is a non-root distroless image whose
// entrypoint is the binary.
func TestDockerfile(t *testing.T) {
	df := readDockerfile(t)

	gomod, err := os.ReadFile(filepath.Join(repoRoot, "go.mod"))
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^go (\d+\.\d+)`).FindStringSubmatch(string(gomod))
	if m == nil {
		t.Fatal("go.mod has no go directive")
	}
	arg := regexp.MustCompile(`(?m)^ARG GO_VERSION=(\S+)$`).FindStringSubmatch(df)
	if arg == nil || arg[1] != m[1] {
		t.Errorf("Dockerfile: ARG GO_VERSION=%v, want %s (go.mod's go directive)", arg, m[1])
	}
	if !regexp.MustCompile(`(?m)^FROM (--platform=\S+ )?golang:\$\{GO_VERSION\} AS build$`).MatchString(df) {
		t.Error("Dockerfile: the build stage must be FROM golang:${GO_VERSION} AS build")
	}
	for _, want := range []string{
		"CGO_ENABLED=0",
		`go build -trimpath -ldflags "-s -w" -o /out/tokenpipe ./cmd/tokenpipe`,
		"COPY go.mod go.sum ./",
	} {
		if !strings.Contains(df, want) {
			t.Errorf("Dockerfile: missing %q", want)
		}
	}
	if _, err := os.Stat(filepath.Join(repoRoot, "cmd", "tokenpipe", "main.go")); err != nil {
		t.Errorf("Dockerfile builds ./cmd/tokenpipe: %v", err)
	}

	// The last stage is what `docker build` produces without --target.
	stages := regexp.MustCompile(`(?m)^FROM `).FindAllStringIndex(df, -1)
	last := df[stages[len(stages)-1][0]:]
	if !regexp.MustCompile(`^FROM (gcr\.io/distroless/static-debian12:nonroot|scratch)\b`).MatchString(last) {
		t.Errorf("Dockerfile: the final stage must be distroless static nonroot or scratch:\n%s", firstLine(last))
	}
	for _, want := range []string{"USER 65532", `ENTRYPOINT ["/tokenpipe"]`, "COPY --from=build /out/tokenpipe /tokenpipe"} {
		if !strings.Contains(last, want) {
			t.Errorf("Dockerfile: the final stage lacks %q", want)
		}
	}
	if strings.Contains(last, "RUN ") {
		t.Error("Dockerfile: the final stage has no shell; RUN cannot work there")
	}

	ignore, err := os.ReadFile(dockerfilePath + ".dockerignore")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(ignore), "\n") {
		line = strings.TrimSpace(line)
		for _, needed := range []string{"go.mod", "go.sum", "cmd", "schema"} {
			if line == needed || line == needed+"/" || line == "*" {
				t.Errorf("Dockerfile.dockerignore excludes %q, which the build needs", line)
			}
		}
	}
}

func firstLine(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i]
	}
	return s
}
