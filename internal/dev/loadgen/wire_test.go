package loadgen

import (
	"bufio"
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// TestWireClientAgainstNetHTTP: the generator's own HTTP client sends what a
// net/http server parses as a client_credentials request with Basic
// credentials, and reads each kind of answer the server writes: plain,
// chunked, an error, and one that closes the connection.
func TestWireClientAgainstNetHTTP(t *testing.T) {
	t.Parallel()
	var n atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		user, pass, ok := r.BasicAuth()
		if err := r.ParseForm(); err != nil || !ok || user != "c%2F1" || pass != "s%3Ax" ||
			r.PostForm.Get("grant_type") != "client_credentials" || r.Method != http.MethodPost || r.URL.Path != "/oauth2/token" {
			w.WriteHeader(http.StatusBadRequest)
			fmt.Fprintf(w, `{"error":"invalid_request","got":%q}`, r.PostForm.Encode())
			return
		}
		i := n.Add(1)
		switch r.PostForm.Get("scope") {
		case "chunked x":
			w.Header().Set("Content-Type", "application/json")
			fmt.Fprint(w, `{"access_token":`)
			w.(http.Flusher).Flush() // forces chunked encoding
			fmt.Fprintf(w, `"tok-%d"}`, i)
		case "close x":
			w.Header().Set("Connection", "close")
			fmt.Fprintf(w, `{"access_token":"tok-%d"}`, i)
		case "deny x":
			w.WriteHeader(http.StatusForbidden)
			fmt.Fprint(w, `{"error":"invalid_scope"}`)
		default:
			fmt.Fprintf(w, `{"token_type":"Bearer","access_token":"tok-%d","expires_in":60}`, i)
		}
	}))
	defer srv.Close()
	g := New(Target{URL: srv.URL + "/oauth2/token", ClientID: "c/1", Secret: "s:x", ScopePool: 10}, Mix{}, 4)
	defer g.Close()
	ctx := context.Background()
	for _, c := range []struct{ scope, wantErr string }{
		{"plain x", ""}, {"chunked x", ""}, {"plain x", ""}, {"close x", ""}, {"plain x", ""},
		{"deny x", "HTTP 403 invalid_scope"}, {"plain x", ""},
	} {
		tok, errKind := g.request(ctx, c.scope)
		if errKind != c.wantErr || (c.wantErr == "" && !strings.HasPrefix(tok, "tok-")) {
			t.Fatalf("scope %q: token %q, error %q; want error %q", c.scope, tok, errKind, c.wantErr)
		}
	}
}

// TestWireClientResendsOnClosedIdleConnection: a kept-alive connection the
// server closed while it was idle costs no failed request.
func TestWireClientResendsOnClosedIdleConnection(t *testing.T) {
	t.Parallel()
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, `{"access_token":"tok"}`)
	}))
	srv.Config.IdleTimeout = 50 * time.Millisecond
	srv.Start()
	defer srv.Close()
	g := New(Target{URL: srv.URL, ClientID: "c", Secret: "s", ScopePool: 10}, Mix{}, 1)
	defer g.Close()
	for i := range 3 {
		if tok, errKind := g.request(context.Background(), "a b"); tok != "tok" {
			t.Fatalf("request %d: %q %q", i, tok, errKind)
		}
		time.Sleep(150 * time.Millisecond) // the server closes the idle connection
	}
}

func TestReadAnswerRejectsGarbage(t *testing.T) {
	t.Parallel()
	for _, in := range []string{"", "SSH-2.0\r\n", "HTTP/1.1 2x0 OK\r\n\r\n", "HTTP/1.1 200 OK\r\nbroken\r\n\r\n", "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n"} {
		if _, _, _, err := readAnswer(bufio.NewReader(strings.NewReader(in))); err == nil {
			t.Errorf("%q: no error", in)
		}
	}
	status, body, closing, err := readAnswer(bufio.NewReader(strings.NewReader("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}extra")))
	if err != nil || status != 200 || string(body) != "{}" || closing {
		t.Fatalf("got %d %q %v %v", status, body, closing, err)
	}
}
