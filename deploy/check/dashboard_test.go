package check

import (
	"bytes"
	"encoding/json"
	"os"
	"strings"
	"testing"
)

const dashboardPath = "../grafana-dashboard.json"

type dashPanel struct {
	ID         int             `json:"id"`
	Type       string          `json:"type"`
	Title      string          `json:"title"`
	Datasource *dashDatasource `json:"datasource"`
	Targets    []struct {
		Expr       string          `json:"expr"`
		RefID      string          `json:"refId"`
		Datasource *dashDatasource `json:"datasource"`
	} `json:"targets"`
	GridPos struct {
		H, W, X, Y int
	} `json:"gridPos"`
	Panels []dashPanel `json:"panels"` // a row's panels
}

type dashDatasource struct {
	Type string `json:"type"`
	UID  string `json:"uid"`
}

type dashboard struct {
	UID           string      `json:"uid"`
	Title         string      `json:"title"`
	SchemaVersion int         `json:"schemaVersion"`
	Panels        []dashPanel `json:"panels"`
	Templating    struct {
		List []struct {
			Name  string `json:"name"`
			Type  string `json:"type"`
			Query string `json:"query"`
		} `json:"list"`
	} `json:"templating"`
}

// TestGrafanaDashboard: the JSON parses, every panel has a query, every query
// uses the ${DS_PROMETHEUS} datasource variable, and every metric the
// runbook relies on is charted.
func TestGrafanaDashboard(t *testing.T) {
	b, err := os.ReadFile(dashboardPath)
	if err != nil {
		t.Fatal(err)
	}
	if !json.Valid(b) {
		t.Fatal("grafana-dashboard.json is not valid JSON")
	}
	var d dashboard
	if err := json.NewDecoder(bytes.NewReader(b)).Decode(&d); err != nil {
		t.Fatal(err)
	}
	if d.UID == "" || d.Title == "" {
		t.Error("dashboard needs a uid and a title")
	}
	if d.SchemaVersion < 36 {
		t.Errorf("schemaVersion %d: want a current Grafana schema (~39)", d.SchemaVersion)
	}
	var dsVar bool
	for _, v := range d.Templating.List {
		if v.Name == "DS_PROMETHEUS" && v.Type == "datasource" && v.Query == "prometheus" {
			dsVar = true
		}
	}
	if !dsVar {
		t.Error("templating needs a datasource variable DS_PROMETHEUS of type prometheus")
	}

	var all []dashPanel
	var walk func([]dashPanel)
	walk = func(ps []dashPanel) {
		for _, p := range ps {
			all = append(all, p)
			walk(p.Panels)
		}
	}
	walk(d.Panels)
	ids := map[int]string{}
	var exprs []string
	for _, p := range all {
		if prev, dup := ids[p.ID]; dup || p.ID == 0 {
			t.Errorf("panel %q: id %d missing or also used by %q", p.Title, p.ID, prev)
		}
		ids[p.ID] = p.Title
		if p.Type == "row" {
			continue
		}
		if p.GridPos.W <= 0 || p.GridPos.H <= 0 || p.GridPos.X+p.GridPos.W > 24 {
			t.Errorf("panel %q: bad gridPos %+v", p.Title, p.GridPos)
		}
		if p.Datasource == nil || p.Datasource.UID != "${DS_PROMETHEUS}" {
			t.Errorf("panel %q: datasource must be ${DS_PROMETHEUS}", p.Title)
		}
		n := 0
		for _, tg := range p.Targets {
			if strings.TrimSpace(tg.Expr) == "" {
				t.Errorf("panel %q: target %s has no expr", p.Title, tg.RefID)
				continue
			}
			if tg.Datasource != nil && tg.Datasource.UID != "${DS_PROMETHEUS}" {
				t.Errorf("panel %q: target %s datasource %q", p.Title, tg.RefID, tg.Datasource.UID)
			}
			if !balanced(tg.Expr) {
				t.Errorf("panel %q: unbalanced brackets in %q", p.Title, tg.Expr)
			}
			exprs = append(exprs, tg.Expr)
			n++
		}
		if n == 0 {
			t.Errorf("panel %q (%s) has no target with an expr", p.Title, p.Type)
		}
	}
	joined := strings.Join(exprs, "\n")
	for _, metric := range []string{
		"tokenpipe_issuer_tokens_issued_total",
		"tokenpipe_issuer_publish_duration_seconds_bucket",
		"tokenpipe_issuer_publish_errors_total",
		"tokenpipe_http_request_duration_seconds_bucket",
		"tokenpipe_persister_rows_persisted_total",
		"tokenpipe_persister_batch_size_bucket",
		"tokenpipe_persister_commit_duration_seconds_bucket",
		"tokenpipe_persister_retries_total",
		"tokenpipe_persister_redeliveries_total",
		"tokenpipe_persister_dead_lettered_total",
		"tokenpipe_recovery_conflicts_resolved_total",
		"tokenpipe_recovery_tokens_deactivated_total",
		"tokenpipe_recovery_batch_duration_seconds_bucket",
		"tokenpipe_consumer_pending_messages",
		"tokenpipe_consumer_ack_pending_messages",
		"tokenpipe_nats_reconnects_total",
	} {
		if !strings.Contains(joined, metric) {
			t.Errorf("no panel queries %s", metric)
		}
	}
}

// balanced reports whether (), [] and {} nest properly, outside strings.
func balanced(s string) bool {
	var stack []rune
	pairs := map[rune]rune{')': '(', ']': '[', '}': '{'}
	inStr := false
	for _, r := range s {
		switch {
		case r == '"':
			inStr = !inStr
		case inStr:
		case r == '(' || r == '[' || r == '{':
			stack = append(stack, r)
		case r == ')' || r == ']' || r == '}':
			if len(stack) == 0 || stack[len(stack)-1] != pairs[r] {
				return false
			}
			stack = stack[:len(stack)-1]
		}
	}
	return len(stack) == 0 && !inStr
}
