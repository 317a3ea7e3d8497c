package issuer

import (
	"context"
	"net/http"
	"sync"
	"time"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/tokens"
)

// introspection is an RFC 7662 answer.
type introspection struct {
	Active    bool   `json:"active"`
	ClientID  string `json:"client_id,omitempty"`
	Subject   string `json:"sub,omitempty"`
	Username  string `json:"username,omitempty"`
	Scope     string `json:"scope,omitempty"`
	TokenType string `json:"token_type,omitempty"`
	Exp       int64  `json:"exp,omitempty"`
	Iat       int64  `json:"iat,omitempty"`
}

// introspect answers POST /oauth2/introspect (RFC 7662) for an
// authenticated client: about its own tokens, or any token for a resource
// server (a client registered with the introspect permission).
func (s *Server) introspect(w http.ResponseWriter, r *http.Request) {
	caller, text, ok := s.tokenRequest(w, r)
	if !ok {
		return
	}
	start := time.Now()
	if !s.mayIntrospect(caller, text) {
		s.metrics.introspectSeconds.WithLabelValues("denied").Observe(time.Since(start).Seconds())
		writeJSON(w, http.StatusOK, &introspection{})
		return
	}
	ans, source, err := s.introspection(r.Context(), caller.ID, text, start)
	if err != nil {
		s.writeError(w, err)
		return
	}
	s.metrics.introspectSeconds.WithLabelValues(source).Observe(time.Since(start).Seconds())
	writeJSON(w, http.StatusOK, ans)
}

// introspection decides whether text is an active token, for the client
// caller. Expiry and signature need no lookup; whether the token was revoked
// or deactivated does, and is cached. source says where the answer came
// from, for metrics.
//
// A refresh token is a credential for the authorization server only (RFC
// 6749 section 10.4): it introspects as active only to its own client, and
// always with token_type refresh_token, so no resource server can mistake
// it for an access token.
func (s *Server) introspection(ctx context.Context, caller, text string, now time.Time) (*introspection, string, error) {
	inactive := &introspection{}
	c, err := s.cfg.Keys.Decode(text)
	if err != nil {
		return inactive, "invalid", nil
	}
	if c.Expired(now) {
		return inactive, "expired", nil
	}
	if c.Kind == tokens.Refresh && c.ClientID != caller {
		return inactive, "foreign_refresh", nil
	}
	d := events.DigestOf(text)
	if live, ok := s.cache.get(d, now); ok {
		return answer(c, live), "cache", nil
	}
	gen := s.cache.begin()
	if c.Kind == tokens.Refresh {
		st, err := s.refreshState(ctx, d, c)
		if err != nil {
			return nil, "", err
		}
		live := !st.revoked && st.userExists && (st.answeredAt == nil || now.Sub(*st.answeredAt) <= s.cfg.RefreshGrace)
		if !live {
			s.cache.put(d, gen, false, c.ExpiresAt)
		}
		return answer(c, live), "database", nil
	}
	st, err := s.accessStatus(ctx, d, c)
	if err != nil {
		return nil, "", err
	}
	live := st.Live()
	// Only a row's answer is cached. Without a row the token is queued, and
	// the persister may yet write it INACTIVE (a newer token of its key got
	// there first) without any notice. A rotated token's answer lives no
	// longer than its batch window, and says so in exp.
	a := answer(c, live)
	if live && st.ValidUntil != nil && st.ValidUntil.Before(c.ExpiresAt) {
		a.Exp = st.ValidUntil.Unix()
	}
	// Nor is a live answer for a token exchanged without an answer yet: its
	// window starts with the answer, on any instance, and a cached answer
	// would outlive it.
	if st.State != nil && !(live && st.Exchanged && st.ValidUntil == nil) {
		until := c.ExpiresAt
		if st.ValidUntil != nil && st.ValidUntil.Before(until) {
			until = *st.ValidUntil
		}
		if ttl := now.Add(s.cfg.IntrospectCacheTTL); live && ttl.Before(until) {
			until = ttl
		}
		s.cache.put(d, gen, live, until)
	}
	return a, "database", nil
}

func answer(c tokens.Claims, live bool) *introspection {
	if !live {
		return &introspection{}
	}
	a := &introspection{Active: true, ClientID: c.ClientID, Subject: c.Subject, Scope: c.Scope,
		Exp: c.ExpiresAt.Unix(), Iat: c.IssuedAt.Unix(), TokenType: "Bearer"}
	if c.Kind == tokens.Refresh {
		a.TokenType = tokens.Refresh.String()
	}
	if c.Grant == "password" || (c.Grant != "client_credentials" && c.Subject != c.ClientID) {
		a.Username = c.Subject
	}
	return a
}

// tombstoneTTL is how long a notice keeps a token out of the cache.
// Recovery announces a deactivation just before its commit, so a lookup right
// after the notice may still read the old row; the tombstone stops that read
// from being cached. It only needs to outlast a commit.
const tombstoneTTL = 30 * time.Second

// introCache holds introspection answers for rows. A positive answer lives
// for the cache TTL at most; notices of revocation and deactivation remove
// it at once. A negative answer is final (a token never becomes ACTIVE
// again) and lives until the token expires.
type introCache struct {
	ttl time.Duration
	max int

	mu      sync.Mutex
	entries map[events.Digest]cacheEntry
	tombs   map[events.Digest]time.Time
	gen     uint64 // bumped by every notice: fills begun before it are dropped
	puts    int
}

type cacheEntry struct {
	live  bool
	until time.Time
}

func newIntroCache(ttl time.Duration, max int) *introCache {
	return &introCache{ttl: ttl, max: max, entries: map[events.Digest]cacheEntry{}, tombs: map[events.Digest]time.Time{}}
}

func (c *introCache) get(d events.Digest, now time.Time) (live, ok bool) {
	if c.ttl <= 0 {
		return false, false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.entries[d]
	if !ok || !now.Before(e.until) {
		return false, false
	}
	return e.live, true
}

// begin returns the generation a fill must still see when it stores.
func (c *introCache) begin() uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.gen
}

func (c *introCache) put(d events.Digest, gen uint64, live bool, until time.Time) {
	if c.ttl <= 0 {
		return
	}
	now := time.Now()
	c.mu.Lock()
	defer c.mu.Unlock()
	if gen != c.gen {
		return // a notice arrived while this answer was read
	}
	if t, ok := c.tombs[d]; ok && now.Before(t) && live {
		return
	}
	c.puts++
	if c.puts%1024 == 0 || len(c.entries) >= c.max {
		c.sweep(now)
	}
	if len(c.entries) >= c.max {
		return
	}
	c.entries[d] = cacheEntry{live: live, until: until}
}

func (c *introCache) sweep(now time.Time) {
	for d, e := range c.entries {
		if !now.Before(e.until) {
			delete(c.entries, d)
		}
	}
	for d, t := range c.tombs {
		if !now.Before(t) {
			delete(c.tombs, d)
		}
	}
}

// invalidate forgets the given tokens and keeps them out for tombstoneTTL.
func (c *introCache) invalidate(ds []events.Digest) {
	until := time.Now().Add(tombstoneTTL)
	c.mu.Lock()
	defer c.mu.Unlock()
	c.gen++
	for _, d := range ds {
		delete(c.entries, d)
		c.tombs[d] = until
	}
}
