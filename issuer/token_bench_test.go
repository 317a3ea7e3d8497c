package issuer_test

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// BenchmarkTokenHandler is the token endpoint's own cost per client
// credentials grant, without a connection: the handler chain (metrics,
// guard, routing), authentication, minting, publishing to JetStream and
// waiting for its acknowledgement, and encoding the answer. Run with
// -benchmem to see the allocations per token; -cpu 2 matches the machine.
func BenchmarkTokenHandler(b *testing.B) {
	e := newAttackBenchEnv(b, nil)
	h := e.iss.Handler()
	body := "grant_type=client_credentials&scope=read"
	b.ReportAllocs()
	b.SetParallelism(64) // requests in flight, as a loaded issuer has
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			req := httptest.NewRequest(http.MethodPost, "/oauth2/token", strings.NewReader(body))
			req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
			req.SetBasicAuth("narrow", e.narrow)
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, req)
			if rec.Code != http.StatusOK {
				b.Fatalf("status %d: %s", rec.Code, rec.Body)
			}
		}
	})
}
