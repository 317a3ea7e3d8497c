package bench

import (
	"bytes"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"
)

// ClockTicks is USER_HZ, the unit of utime and stime in /proc/<pid>/stat. The
// kernel reports these fields in USER_HZ whatever its internal HZ, and
// USER_HZ is 100 on every Linux architecture Go supports (getconf CLK_TCK).
const ClockTicks = 100

// ParseProcStat returns utime+stime from the text of /proc/<pid>/stat. The
// command name (field 2) is in parentheses and may itself hold spaces and
// parentheses, so fields are counted from the last ')'.
func ParseProcStat(data []byte) (time.Duration, error) {
	end := bytes.LastIndexByte(data, ')')
	if end < 0 {
		return 0, fmt.Errorf("proc stat: no command name")
	}
	// After ')': state(3) ppid(4) ... utime(14) stime(15).
	f := strings.Fields(string(data[end+1:]))
	if len(f) < 13 {
		return 0, fmt.Errorf("proc stat: %d fields after the command name, want at least 13", len(f))
	}
	utime, err := strconv.ParseUint(f[11], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("proc stat utime: %w", err)
	}
	stime, err := strconv.ParseUint(f[12], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("proc stat stime: %w", err)
	}
	return time.Duration(utime+stime) * (time.Second / ClockTicks), nil
}

// ProcCPU is the user plus system CPU time process pid has used so far, all
// its threads included.
func ProcCPU(pid int) (time.Duration, error) {
	data, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		return 0, err
	}
	return ParseProcStat(data)
}

// ParseMachineCPU returns the busy CPU time of all cores (user, nice,
// system, irq, softirq; not idle, iowait or steal, the time a virtual
// machine's host kept for itself) from the text of /proc/stat, so a run can show how much
// of the machine's work was not its own.
func ParseMachineCPU(data []byte) (time.Duration, error) {
	line, _, _ := strings.Cut(string(data), "\n")
	f := strings.Fields(line)
	if len(f) < 5 || f[0] != "cpu" {
		return 0, fmt.Errorf("proc stat: no cpu line")
	}
	var busy uint64
	// user nice system idle iowait irq softirq steal (guest is inside user).
	for i, v := range f[1:min(len(f), 9)] {
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("proc stat cpu field %d: %w", i+1, err)
		}
		if i != 3 && i != 4 && i != 7 {
			busy += n
		}
	}
	return time.Duration(busy) * (time.Second / ClockTicks), nil
}

// MachineCPU is ParseMachineCPU of this machine's /proc/stat.
func MachineCPU() (time.Duration, error) {
	data, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, err
	}
	return ParseMachineCPU(data)
}

// ListenerPID finds the process listening on TCP port on this machine, from
// /proc/net/tcp{,6} and the socket links under /proc/<pid>/fd (reading
// another user's fds needs the privilege to). 0 if none was found.
func ListenerPID(port int) int {
	inodes := map[string]bool{}
	for _, f := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		data, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		for _, ino := range listenInodes(data, port) {
			inodes[ino] = true
		}
	}
	if len(inodes) == 0 {
		return 0
	}
	procs, _ := os.ReadDir("/proc")
	for _, p := range procs {
		pid, err := strconv.Atoi(p.Name())
		if err != nil {
			continue
		}
		fds, err := os.ReadDir(filepath.Join("/proc", p.Name(), "fd"))
		if err != nil {
			continue
		}
		for _, fd := range fds {
			link, err := os.Readlink(filepath.Join("/proc", p.Name(), "fd", fd.Name()))
			if err == nil && strings.HasPrefix(link, "socket:[") && inodes[strings.TrimSuffix(link[len("socket:["):], "]")] {
				return pid
			}
		}
	}
	return 0
}

// listenInodes returns the socket inodes of the LISTEN (0A) entries on port
// in the text of /proc/net/tcp or tcp6.
func listenInodes(data []byte, port int) []string {
	var out []string
	suffix := fmt.Sprintf(":%04X", port)
	for _, line := range strings.Split(string(data), "\n")[1:] {
		f := strings.Fields(line)
		if len(f) < 10 || f[3] != "0A" || !strings.HasSuffix(f[1], suffix) {
			continue
		}
		out = append(out, f[9])
	}
	return out
}

// PIDsByCommand returns the processes whose command line contains s (as
// pgrep -f does), this one excluded.
func PIDsByCommand(s string) []int {
	var out []int
	procs, _ := os.ReadDir("/proc")
	for _, p := range procs {
		pid, err := strconv.Atoi(p.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		cmd, err := os.ReadFile(filepath.Join("/proc", p.Name(), "cmdline"))
		if err == nil && bytes.Contains(cmd, []byte(s)) {
			out = append(out, pid)
		}
	}
	return out
}

// RoleCost is one process (or group of processes) measured over every run.
type RoleCost struct {
	Role string
	// Goal is the most microseconds of CPU per token the issue allows; 0 for
	// no goal.
	Goal float64
	// PerToken is µs of CPU per 200 answer, and Cores the CPU used over the
	// wall time of the interval (1 = one core), one entry per run.
	PerToken []float64
	Cores    []float64
	// Missing says why the role was not measured; the row then shows it.
	Missing string
}

// RolesRun is what one measured interval gave besides CPU.
type RolesRun struct {
	Rate                float64 // 200 answers per second
	HTTPP50, HTTPP99    float64 // ms
	LagP50, LagP99      time.Duration
	Tokens              int
	Errors, Unpersisted int
	// MachineCores is the whole machine's busy CPU over the interval, and
	// MeasuredCores the part the measured processes account for: the rest
	// is other work competing for the same cores.
	MachineCores, MeasuredCores float64
	ErrorKinds                  map[string]int // failed requests by kind (status, transport, dropped)
}

// RolesReport is the whole benchmark.
type RolesReport struct {
	Rate        float64 // offered
	Duration    time.Duration
	Runs        []RolesRun
	Roles       []RoleCost
	NATSVersion string
	NATSWhere   string // the machine's server or a child built from the module
	PGVersion   string
	Notes       []string
}

// WriteTable prints the report as Markdown: one row per role, medians with
// their range, and whether each goal is met.
func (r *RolesReport) WriteTable(w io.Writer) {
	fmt.Fprintf(w, "CPU per token per role: roles as separate processes, %.0f tokens/s offered for %s, %d run(s), median [min-max]\n\n",
		r.Rate, r.Duration, len(r.Runs))
	fmt.Fprintln(w, "| role | µs CPU per token | % of a core | goal (µs) | met |")
	fmt.Fprintln(w, "|---|---|---|---|---|")
	var total []float64
	for _, c := range r.Roles {
		if c.Missing != "" || len(c.PerToken) == 0 {
			fmt.Fprintf(w, "| %s | not measured (%s) | | %s | |\n", c.Role, c.Missing, goal(c.Goal))
			continue
		}
		if total == nil {
			total = make([]float64, len(c.PerToken))
		}
		for i, v := range c.PerToken {
			if i < len(total) {
				total[i] += v
			}
		}
		pt, co := stat(c.PerToken), stat(c.Cores)
		met := ""
		if c.Goal > 0 {
			met = "no"
			if pt.Median <= c.Goal {
				met = "yes"
			}
		}
		fmt.Fprintf(w, "| %s | %.0f [%.0f-%.0f] | %.1f [%.1f-%.1f] | %s | %s |\n",
			c.Role, pt.Median, pt.Min, pt.Max, 100*co.Median, 100*co.Min, 100*co.Max, goal(c.Goal), met)
	}
	if total != nil {
		t := stat(total)
		fmt.Fprintf(w, "| **all measured** | %.0f [%.0f-%.0f] | | | |\n", t.Median, t.Min, t.Max)
	}
	if len(r.Runs) > 0 {
		fmt.Fprintln(w)
	}
	WriteRunLines(w, r.Runs)
	fmt.Fprintf(w, "\nNATS server %s (%s); PostgreSQL %s\n", r.NATSVersion, r.NATSWhere, r.PGVersion)
	for _, n := range r.Notes {
		fmt.Fprintf(w, "- %s\n", n)
	}
}

func goal(g float64) string {
	if g == 0 {
		return "-"
	}
	return fmt.Sprintf("<= %.0f", g)
}

// WriteRunLines prints what the measured intervals gave besides CPU: rate,
// latencies, failures, and how busy the machine was. Nothing for no runs.
func WriteRunLines(w io.Writer, runs []RolesRun) {
	if len(runs) == 0 {
		return
	}
	col := func(f func(RolesRun) float64) Stat {
		xs := make([]float64, len(runs))
		for i, run := range runs {
			xs[i] = f(run)
		}
		return stat(xs)
	}
	ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
	rate := col(func(x RolesRun) float64 { return x.Rate })
	h50, h99 := col(func(x RolesRun) float64 { return x.HTTPP50 }), col(func(x RolesRun) float64 { return x.HTTPP99 })
	l50, l99 := col(func(x RolesRun) float64 { return ms(x.LagP50) }), col(func(x RolesRun) float64 { return ms(x.LagP99) })
	errs, unp := 0, 0
	kinds := map[string]int{}
	for _, x := range runs {
		errs += x.Errors
		unp += x.Unpersisted
		for k, n := range x.ErrorKinds {
			kinds[k] += n
		}
	}
	failed := strconv.Itoa(errs)
	if len(kinds) > 0 {
		var parts []string
		for _, k := range slices.Sorted(maps.Keys(kinds)) {
			parts = append(parts, fmt.Sprintf("%s %d", k, kinds[k]))
		}
		failed += " (" + strings.Join(parts, ", ") + ")"
	}
	fmt.Fprintf(w, "achieved %.0f tokens/s [%.0f-%.0f]; HTTP p50 %.1f ms [%.1f-%.1f], p99 %.1f ms [%.1f-%.1f]; "+
		"persist lag p50 %.0f ms [%.0f-%.0f], p99 %.0f ms [%.0f-%.0f]; failed requests %s, unpersisted tokens %d\n",
		rate.Median, rate.Min, rate.Max, h50.Median, h50.Min, h50.Max, h99.Median, h99.Min, h99.Max,
		l50.Median, l50.Min, l50.Max, l99.Median, l99.Min, l99.Max, failed, unp)
	if runs[0].MachineCores > 0 {
		mc := col(func(x RolesRun) float64 { return x.MachineCores })
		me := col(func(x RolesRun) float64 { return x.MeasuredCores })
		fmt.Fprintf(w, "machine busy %.2f cores [%.2f-%.2f] of %d, of which the measured processes %.2f [%.2f-%.2f]\n",
			mc.Median, mc.Min, mc.Max, runtime.NumCPU(), me.Median, me.Min, me.Max)
	}
}
