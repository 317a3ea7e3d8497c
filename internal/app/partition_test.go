package app

import (
	"slices"
	"strings"
	"testing"

	"github.com/tokenpipe/tokenpipe/internal/consume"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
)

func TestParsePartitionSet(t *testing.T) {
	t.Parallel()
	good := map[string][]int{
		"":          nil,
		"  ":        nil,
		"2":         {2},
		"0,2":       {0, 2},
		"3, 1-2, 1": {1, 2, 3},
		"0-7":       {0, 1, 2, 3, 4, 5, 6, 7},
	}
	for in, want := range good {
		got, err := ParsePartitionSet(in, 8)
		if err != nil || !slices.Equal(got, want) {
			t.Errorf("ParsePartitionSet(%q, 8) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, in := range []string{"8", "-1", "3-2", "a", "1,,2", "0-8", "1.5"} {
		if got, err := ParsePartitionSet(in, 8); err == nil {
			t.Errorf("ParsePartitionSet(%q, 8) = %v, want an error", in, got)
		}
	}
	if _, err := ParsePartitionSet("0", 1); err == nil || !strings.Contains(err.Error(), "PARTITIONS is 1") {
		t.Errorf("a set without partitions: %v", err)
	}
}

func TestPersisterPools(t *testing.T) {
	t.Parallel()
	topo := testenv.Topology()
	s := consume.Settings{Pool: consume.Config{Workers: 3, BatchSize: 100}, Topology: topo}
	if pools := persisterPools(s, nil); len(pools) != 1 || pools[0].Pool.Workers != 3 || pools[0].Topology.Persister != topo.Persister {
		t.Fatalf("unpartitioned: %+v, want today's one pool of 3 workers", pools)
	}
	s.Topology.Partitions = 4
	names := func(pools []consume.Settings) []string {
		var out []string
		for _, p := range pools {
			if p.Pool.Workers != 1 {
				t.Errorf("pool %s has %d workers, want one writer", p.Topology.Persister, p.Pool.Workers)
			}
			out = append(out, p.Topology.Persister)
		}
		return out
	}
	if got, want := names(persisterPools(s, []int{0, 2})), []string{topo.Persister + "-p0", topo.Persister, topo.Persister + "-p2"}; !slices.Equal(got, want) {
		t.Errorf("bound to 0,2: %v, want %v", got, want)
	}
	if got := names(persisterPools(s, nil)); len(got) != 5 {
		t.Errorf("bound to all: %v, want 4 partitions and the unpartitioned consumer", got)
	}
	if got := names(persisterPools(s, []int{3})); !slices.Equal(got, []string{topo.Persister + "-p3"}) {
		t.Errorf("bound to 3: %v", got)
	}
}

func TestPartitionVariablesAreChecked(t *testing.T) {
	t.Setenv("TOKENPIPE_PARTITIONS", "0")
	var cfg PersisterConfig
	if _, err := LoadConfig("persister", nil, nil, &cfg, ""); err == nil || !strings.Contains(err.Error(), "TOKENPIPE_PARTITIONS") {
		t.Errorf("PARTITIONS=0: %v", err)
	}
	t.Setenv("TOKENPIPE_PARTITIONS", "4")
	t.Setenv("TOKENPIPE_PARTITION_SET", "1-4")
	if _, err := LoadConfig("persister", nil, nil, &cfg, ""); err == nil || !strings.Contains(err.Error(), "TOKENPIPE_PARTITION_SET") {
		t.Errorf("PARTITION_SET=1-4 of 4: %v", err)
	}
	t.Setenv("TOKENPIPE_PARTITION_SET", "1-3")
	if _, err := LoadConfig("persister", nil, nil, &cfg, ""); err != nil || !slices.Equal(cfg.partitions, []int{1, 2, 3}) {
		t.Errorf("PARTITION_SET=1-3 of 4: %v, %v", cfg.partitions, err)
	}
}
