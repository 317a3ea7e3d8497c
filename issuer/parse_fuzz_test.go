package issuer

import (
	"bytes"
	"encoding/base64"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// FuzzParseRequest feeds arbitrary bodies, content types and Authorization
// headers to the token endpoint's parser. It must never panic, must answer
// every rejection with an RFC 6749 error, and whatever it accepts must carry
// non-empty credentials from exactly one method.
func FuzzParseRequest(f *testing.F) {
	f.Add("grant_type=client_credentials&scope=read", "application/x-www-form-urlencoded", "Basic "+base64.StdEncoding.EncodeToString([]byte("app:secret")))
	f.Add("grant_type=password&username=a&password=b&client_id=app&client_secret=s", "application/x-www-form-urlencoded; charset=utf-8", "")
	f.Add("grant_type=client_credentials&client_secret=x", "application/x-www-form-urlencoded", "Basic YXBwOnNlY3JldA==")
	f.Add("%zz", "application/x-www-form-urlencoded", "")
	f.Add(`{"grant_type":"client_credentials"}`, "application/json", "")
	f.Add("grant_type=a&grant_type=b", "application/x-www-form-urlencoded", "Basic Og==")
	f.Add(strings.Repeat("x", 5000), "application/x-www-form-urlencoded", "Basic %%%")
	f.Fuzz(func(t *testing.T, body, contentType, auth string) {
		r := httptest.NewRequest(http.MethodPost, "/oauth2/token", bytes.NewBufferString(body))
		r.Header.Set("Content-Type", contentType)
		if auth != "" {
			r.Header.Set("Authorization", auth)
		}
		req, err := parseRequest(r, 4096)
		if err != nil {
			var oe *oauthError
			if !errors.As(err, &oe) || oe.code == "" || oe.status < 400 || oe.status > 499 {
				t.Fatalf("rejection is not an RFC 6749 error: %#v", err)
			}
			return
		}
		if req.clientID == "" || req.clientSecret == "" {
			t.Fatalf("accepted a request without credentials: %+v", req)
		}
		if req.basic && req.form.Has("client_secret") {
			t.Fatal("accepted two client authentication methods")
		}
		for k, v := range req.form {
			if len(v) != 1 {
				t.Fatalf("accepted repeated parameter %q", k)
			}
		}
	})
}
