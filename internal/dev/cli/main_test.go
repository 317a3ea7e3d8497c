package cli

import (
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
)

// devDir holds the development binary the package's tests build once.
var devDir string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "tokenpipe-dev-test-")
	if err != nil {
		panic(err)
	}
	devDir = dir
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

var (
	buildOnce sync.Once
	buildOut  []byte
	buildErr  error
)

// buildDev builds the development binary (once for the package's tests)
// and returns its path.
func buildDev(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(devDir, "tokenpipe-dev")
	buildOnce.Do(func() {
		buildOut, buildErr = exec.Command("go", "build", "-tags", "dev", "-o", bin, "../../../cmd/tokenpipe").CombinedOutput()
	})
	if buildErr != nil {
		t.Fatalf("build: %v\n%s", buildErr, buildOut)
	}
	return bin
}
