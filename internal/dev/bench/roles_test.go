package bench

import (
	"bytes"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestParseProcStat(t *testing.T) {
	// A command name with spaces and parentheses, as a process may choose.
	line := "4242 (tok (x) y) S 1 4242 4242 0 -1 4194560 1190 0 0 0 1234 567 0 0 20 0 9 0 12345 1000000 500 18446744073709551615\n"
	got, err := ParseProcStat([]byte(line))
	if err != nil {
		t.Fatal(err)
	}
	if want := 1801 * 10 * time.Millisecond; got != want {
		t.Fatalf("utime+stime = %s, want %s", got, want)
	}
	for _, bad := range []string{"", "4242 tok S 1", "4242 (tok) S 1 2 3", "4242 (tok) S 1 4242 4242 0 -1 4194560 1190 0 0 0 x 567 0"} {
		if _, err := ParseProcStat([]byte(bad)); err == nil {
			t.Errorf("ParseProcStat(%q): no error", bad)
		}
	}
}

// TestProcCPUMatchesRusage checks that the fields read from this process's
// /proc/self/stat are its own CPU time, as getrusage counts it.
func TestProcCPUMatchesRusage(t *testing.T) {
	rusage := func() time.Duration {
		var ru syscall.Rusage
		if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
			t.Fatal(err)
		}
		return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	p0, err := ProcCPU(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	r0 := rusage()
	// Spin until 300 ms of CPU are used, however long a busy machine takes.
	x := 0
	for deadline := time.Now().Add(20 * time.Second); rusage()-r0 < 300*time.Millisecond && time.Now().Before(deadline); {
		x++
	}
	r1 := rusage()
	p1, err := ProcCPU(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	// Both ends read in 10 ms ticks, and the two reads are not simultaneous.
	if d := (p1 - p0) - (r1 - r0); d < -40*time.Millisecond || d > 40*time.Millisecond {
		t.Fatalf("/proc counted %s, getrusage %s (%d loops)", p1-p0, r1-r0, x)
	}
	if p1-p0 < 250*time.Millisecond {
		t.Fatalf("/proc counted %s for 300 ms of spinning", p1-p0)
	}
}

func TestParseMachineCPU(t *testing.T) {
	stat := "cpu  100 5 50 1000 20 3 2 1 0 0\ncpu0 50 2 25 500 10 1 1 0 0 0\nintr 1 2 3\n"
	got, err := ParseMachineCPU([]byte(stat))
	if err != nil {
		t.Fatal(err)
	}
	// user+nice+system+irq+softirq = 160 ticks; idle, iowait and steal are not busy.
	if want := 160 * 10 * time.Millisecond; got != want {
		t.Fatalf("busy = %s, want %s", got, want)
	}
	if _, err := ParseMachineCPU([]byte("intr 1 2 3\n")); err == nil {
		t.Fatal("no error without a cpu line")
	}
}

func TestListenInodes(t *testing.T) {
	tcp := `  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:107E 00000000:0000 0A 00000000:00000000 00:00000000 00000000   105        0 31337 1 0000000000000000 100 0 0 10 0
   1: 0100007F:107E 0100007F:D2F0 01 00000000:00000000 00:00000000 00000000   105        0 4444 1 0000000000000000 20 4 30 10 -1
   2: 0100007F:1538 00000000:0000 0A 00000000:00000000 00:00000000 00000000   107        0 5555 1 0000000000000000 100 0 0 10 0
`
	got := listenInodes([]byte(tcp), 4222)
	if len(got) != 1 || got[0] != "31337" {
		t.Fatalf("listen inodes on 4222 = %v, want [31337] (the LISTEN entry, not the connection)", got)
	}
	if got := listenInodes([]byte(tcp), 4223); len(got) != 0 {
		t.Fatalf("listen inodes on 4223 = %v, want none", got)
	}
}

func TestRolesTable(t *testing.T) {
	r := &RolesReport{Rate: 3000, Duration: 20 * time.Second, NATSVersion: "2.9.10", NATSWhere: "pid 1", PGVersion: "15.20",
		Runs: []RolesRun{{Rate: 2990, HTTPP50: 1, HTTPP99: 9, LagP50: 5 * time.Millisecond, LagP99: 30 * time.Millisecond, Tokens: 59800},
			{Rate: 2995, HTTPP50: 2, HTTPP99: 8, LagP50: 6 * time.Millisecond, LagP99: 40 * time.Millisecond, Tokens: 59900,
				Errors: 7, ErrorKinds: map[string]int{"dropped": 5, "http 503": 2}},
			{Rate: 2980, HTTPP50: 3, HTTPP99: 7, LagP50: 7 * time.Millisecond, LagP99: 50 * time.Millisecond, Tokens: 59600}},
		Roles: []RoleCost{
			{Role: "issuer", Goal: 40, PerToken: []float64{170, 160, 180}, Cores: []float64{0.5, 0.48, 0.54}},
			{Role: "persister", Goal: 20, PerToken: []float64{19, 18, 30}, Cores: []float64{0.05, 0.05, 0.09}},
			{Role: "recovery", PerToken: []float64{11, 10, 12}, Cores: []float64{0.03, 0.03, 0.04}},
			{Role: "nats-server", Goal: 40, Missing: "not on this machine"},
		}}
	for i := range r.Runs {
		r.Runs[i].MachineCores, r.Runs[i].MeasuredCores = 1.7+0.1*float64(i), 1.2
	}
	var b bytes.Buffer
	r.WriteTable(&b)
	out := b.String()
	for _, want := range []string{
		"| issuer | 170 [160-180] | 50.0 [48.0-54.0] | <= 40 | no |",
		"| persister | 19 [18-30] | 5.0 [5.0-9.0] | <= 20 | yes |",
		"| recovery | 11 [10-12] | 3.0 [3.0-4.0] | - |  |",
		"| nats-server | not measured (not on this machine) | | <= 40 | |",
		"| **all measured** | 200 [188-222] | | | |",
		"achieved 2990 tokens/s [2980-2995]",
		"HTTP p50 2.0 ms [1.0-3.0], p99 8.0 ms [7.0-9.0]",
		"persist lag p50 6 ms [5-7], p99 40 ms [30-50]",
		"machine busy 1.80 cores [1.70-1.90] of",
		"of which the measured processes 1.20 [1.20-1.20]",
		"failed requests 7 (dropped 5, http 503 2), unpersisted tokens 0",
		"NATS server 2.9.10 (pid 1); PostgreSQL 15.20",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q:\n%s", want, out)
		}
	}
}
