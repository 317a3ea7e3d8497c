// Package clients keeps OAuth clients and password-grant users in Postgres
// and authenticates them for the issuer.
//
// Client secrets are 256-bit random values generated here, so a SHA-256
// digest is enough to store them: there is nothing to guess. User passwords
// are chosen by people and get bcrypt.
package clients

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"golang.org/x/crypto/bcrypt"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/tokens"
)

// Grants a client may be allowed.
var knownGrants = []string{"client_credentials", "password", "refresh_token", tokens.GrantTokenExchange}

var (
	// ErrInvalidClient: unknown client or wrong secret (deliberately not told apart).
	ErrInvalidClient = errors.New("invalid client credentials")
	// ErrInvalidGrant: unknown user or wrong password.
	ErrInvalidGrant = errors.New("invalid resource owner credentials")
	// ErrNotFound: no such client or user to remove.
	ErrNotFound = errors.New("not found")
)

// Client is a registered OAuth client.
type Client struct {
	ID           string
	SecretDigest [sha256.Size]byte
	Scopes       []string // allowed scopes, sorted
	Grants       []string // allowed grant types, sorted
	// Introspect: a resource server, which may introspect other clients'
	// tokens. Every client may introspect its own.
	Introspect bool
	// RotationWindow is the client's own batch window for per-request
	// rotation; nil: the issuer's TOKENPIPE_ROTATION_WINDOW.
	RotationWindow *time.Duration
	CreatedAt      time.Time
	scopeSet       map[string]bool
}

// AllowsScope reports whether the client may request scope.
func (c *Client) AllowsScope(scope string) bool {
	if c.scopeSet == nil {
		return slices.Contains(c.Scopes, scope)
	}
	return c.scopeSet[scope]
}

// Allows reports whether the client may use grant.
func (c *Client) Allows(grant string) bool { return slices.Contains(c.Grants, grant) }

// validID accepts what fits in HTTP Basic and in our key columns. Invalid
// UTF-8 is refused here because Postgres would refuse it later with an error
// that looks like an outage rather than bad input.
func validID(kind, id string) error {
	if id == "" || len(id) > events.MaxClientIDLen {
		return fmt.Errorf("%s must be 1 to %d bytes", kind, events.MaxClientIDLen)
	}
	if !utf8.ValidString(id) {
		return fmt.Errorf("%s is not valid UTF-8", kind)
	}
	for _, r := range id {
		if !unicode.IsPrint(r) || unicode.IsSpace(r) || r == ':' {
			return fmt.Errorf("%s %q may not contain spaces, ':' or control characters", kind, id)
		}
	}
	return nil
}

// ValidClientID reports why id cannot be a client id, or nil. HTTP
// handlers call it before any database work.
func ValidClientID(id string) error { return validID("client id", id) }

// ValidUsername reports why name cannot be a user name, or nil.
func ValidUsername(name string) error { return validID("username", name) }

// nameTaken reports whether err is the database refusing a name that the
// other kind of principal already has (migration 0003).
func nameTaken(err error) bool {
	var pe *pgconn.PgError
	return errors.As(err, &pe) && pe.Code == "23505" && pe.ConstraintName == "principal_names"
}

// validScope accepts one RFC 6749 section 3.3 scope-token:
// 1*( %x21 / %x23-5B / %x5D-7E ), printable ASCII other than space, double
// quote and backslash.
func validScope(s string) error {
	if s == "" {
		return errors.New("a scope may not be empty")
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c < 0x21 || c > 0x7e || c == '"' || c == '\\' {
			return fmt.Errorf("scope %q is not one RFC 6749 scope token (printable ASCII other than space, double quote and backslash)", s)
		}
	}
	return nil
}

// Add registers a client and returns its secret. The secret is shown once:
// only its digest is stored. Every element of scopes must be one scope token
// and every grant one of client_credentials, password, refresh_token,
// urn:ietf:params:oauth:grant-type:token-exchange;
// duplicates are dropped and both sets are stored sorted.
func Add(ctx context.Context, db *pgxpool.Pool, id string, scopes, grants []string) (string, error) {
	return AddWith(ctx, db, id, scopes, grants, Options{})
}

// Options are the permissions of a client beyond its scopes and grants.
type Options struct {
	// Introspect registers a resource server: it may introspect every
	// client's tokens. Without it a client introspects only its own.
	Introspect bool
	// RotationWindow sets the client's own rotation window (see
	// SetRotationWindow); nil leaves it to the issuers' setting.
	RotationWindow *time.Duration
}

// MaxRotationWindow bounds a client's rotation window, as
// TOKENPIPE_ROTATION_WINDOW is bounded.
const MaxRotationWindow = 5 * time.Minute

// ValidRotationWindow checks a client's rotation window: 0 (the presented
// token ends at its exchange's answer) to MaxRotationWindow, in whole
// milliseconds (Postgres keeps microseconds; a window needs no finer).
func ValidRotationWindow(w time.Duration) error {
	if w < 0 || w > MaxRotationWindow || w%time.Millisecond != 0 {
		return fmt.Errorf("rotation window %s: must be between 0 and %s, in whole milliseconds", w, MaxRotationWindow)
	}
	return nil
}

// AddWith is Add with options. A resource server (Introspect) may have no
// grant at all: it then cannot obtain tokens, only check them.
func AddWith(ctx context.Context, db *pgxpool.Pool, id string, scopes, grants []string, opts Options) (string, error) {
	if err := validID("client id", id); err != nil {
		return "", err
	}
	for _, s := range scopes {
		if err := validScope(s); err != nil {
			return "", err
		}
	}
	// No bound on the whole set: a client may be allowed thousands of
	// scopes, as long as each token asks for few enough to fit in an event.
	scopes = sortedSet(scopes)
	if len(grants) == 0 && !opts.Introspect {
		return "", errors.New("at least one grant is required (a resource server with the introspect permission may have none)")
	}
	for _, g := range grants {
		if !slices.Contains(knownGrants, g) {
			return "", fmt.Errorf("grant %q is not one of %s", g, strings.Join(knownGrants, ", "))
		}
	}
	grants = sortedSet(grants)
	if opts.RotationWindow != nil {
		if err := ValidRotationWindow(*opts.RotationWindow); err != nil {
			return "", err
		}
	}
	raw := make([]byte, 32)
	if _, err := rand.Read(raw); err != nil {
		return "", fmt.Errorf("generate secret: %w", err)
	}
	secret := base64.RawURLEncoding.EncodeToString(raw)
	digest := sha256.Sum256([]byte(secret))
	_, err := db.Exec(ctx, `INSERT INTO clients (client_id, secret_digest, scopes, grants, introspect, rotation_window)
		VALUES ($1, $2, $3, $4, $5, $6)`, id, digest[:], scopes, grants, opts.Introspect, opts.RotationWindow)
	if nameTaken(err) {
		return "", fmt.Errorf("client id %q is a user's name: users and clients share one subject namespace", id)
	}
	var pe *pgconn.PgError
	if errors.As(err, &pe) && pe.Code == "23505" {
		return "", fmt.Errorf("client %q already exists", id)
	}
	if err != nil {
		return "", fmt.Errorf("add client: %w", err)
	}
	return secret, nil
}

// sortedSet returns a sorted copy of s without duplicates, never nil (a nil
// slice would be stored as NULL, not as an empty array).
func sortedSet(s []string) []string {
	out := slices.Clone(s)
	slices.Sort(out)
	out = slices.Compact(out)
	if out == nil {
		out = []string{}
	}
	return out
}

// List returns every client, without secrets.
func List(ctx context.Context, db *pgxpool.Pool) ([]Client, error) {
	rows, err := db.Query(ctx, `SELECT client_id, scopes, grants, introspect, rotation_window, created_at FROM clients ORDER BY client_id`)
	if err != nil {
		return nil, fmt.Errorf("list clients: %w", err)
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (Client, error) {
		var c Client
		err := r.Scan(&c.ID, &c.Scopes, &c.Grants, &c.Introspect, &c.RotationWindow, &c.CreatedAt)
		return c, err
	})
}

// SetIntrospect grants or withdraws a client's permission to introspect
// other clients' tokens. Issuers apply it within their client cache TTL.
func SetIntrospect(ctx context.Context, db *pgxpool.Pool, id string, allow bool) error {
	tag, err := db.Exec(ctx, `UPDATE clients SET introspect = $2 WHERE client_id = $1`, id, allow)
	if err != nil {
		return fmt.Errorf("set introspect permission: %w", err)
	}
	if tag.RowsAffected() == 0 {
		return fmt.Errorf("client %q: %w", id, ErrNotFound)
	}
	return nil
}

// SetRotationWindow sets a client's own rotation window, or with nil
// returns it to the issuers' TOKENPIPE_ROTATION_WINDOW. Issuers apply it
// within their client cache TTL, to windows that start after that: a token
// already exchanged keeps the window its exchange's answer gave it.
func SetRotationWindow(ctx context.Context, db *pgxpool.Pool, id string, w *time.Duration) error {
	if w != nil {
		if err := ValidRotationWindow(*w); err != nil {
			return err
		}
	}
	tag, err := db.Exec(ctx, `UPDATE clients SET rotation_window = $2 WHERE client_id = $1`, id, w)
	if err != nil {
		return fmt.Errorf("set rotation window: %w", err)
	}
	if tag.RowsAffected() == 0 {
		return fmt.Errorf("client %q: %w", id, ErrNotFound)
	}
	return nil
}

// SetGrant allows (allow) or withdraws one grant of a client, leaving its
// other grants as they are. Issuers apply it within their client cache TTL
// (at once on the issuer that made the change, see Registry.Forget).
// Withdrawing refresh_token stops the client redeeming refresh tokens
// (unauthorized_client) and receiving new ones; tokens it holds are not
// revoked by this: revoke them separately if they must stop working.
func SetGrant(ctx context.Context, db *pgxpool.Pool, id, grant string, allow bool) error {
	if !slices.Contains(knownGrants, grant) {
		return fmt.Errorf("grant %q is not one of %s", grant, strings.Join(knownGrants, ", "))
	}
	// One statement: two concurrent changes to different grants of one
	// client cannot lose each other's update.
	tag, err := db.Exec(ctx, `UPDATE clients SET grants = coalesce((
			SELECT array_agg(DISTINCT g ORDER BY g) FROM unnest(grants || $2::text) AS g
			WHERE $3 OR g <> $2), '{}')
		WHERE client_id = $1`, id, grant, allow)
	if err != nil {
		return fmt.Errorf("set grant %s of %s: %w", grant, id, err)
	}
	if tag.RowsAffected() == 0 {
		return fmt.Errorf("client %q: %w", id, ErrNotFound)
	}
	return nil
}

// KnownGrant reports whether grant is one a client may be allowed.
func KnownGrant(grant string) bool { return slices.Contains(knownGrants, grant) }

// GrantNames lists the grants a client may be given, for error messages.
func GrantNames() string { return strings.Join(knownGrants, ", ") }

// Remove deletes a client. Issuers stop accepting it within their cache TTL.
func Remove(ctx context.Context, db *pgxpool.Pool, id string) error {
	tag, err := db.Exec(ctx, `DELETE FROM clients WHERE client_id = $1`, id)
	if err != nil {
		return fmt.Errorf("remove client: %w", err)
	}
	if tag.RowsAffected() == 0 {
		return fmt.Errorf("client %q: %w", id, ErrNotFound)
	}
	return nil
}

// AddUser registers a password-grant user with a bcrypt hash of the given
// cost. An existing user's password is replaced, so the same command resets
// a password.
func AddUser(ctx context.Context, db *pgxpool.Pool, username, password string, cost int) error {
	if err := validID("username", username); err != nil {
		return err
	}
	if len(password) < 8 || len(password) > 72 {
		return errors.New("password must be 8 to 72 bytes (bcrypt's limit)")
	}
	hash, err := bcrypt.GenerateFromPassword([]byte(password), cost)
	if err != nil {
		return fmt.Errorf("hash password: %w", err)
	}
	_, err = db.Exec(ctx, `INSERT INTO users (username, password_hash) VALUES ($1, $2)
		ON CONFLICT (username) DO UPDATE SET password_hash = EXCLUDED.password_hash`, username, string(hash))
	if nameTaken(err) {
		return fmt.Errorf("username %q is a client's id: users and clients share one subject namespace", username)
	}
	if err != nil {
		return fmt.Errorf("add user: %w", err)
	}
	return nil
}

// RemoveUser deletes a user.
func RemoveUser(ctx context.Context, db *pgxpool.Pool, username string) error {
	tag, err := db.Exec(ctx, `DELETE FROM users WHERE username = $1`, username)
	if err != nil {
		return fmt.Errorf("remove user: %w", err)
	}
	if tag.RowsAffected() == 0 {
		return fmt.Errorf("user %q: %w", username, ErrNotFound)
	}
	return nil
}

// DefaultCacheTTL is how long a client's registration is cached when
// NewRegistry is given no TTL.
const DefaultCacheTTL = 30 * time.Second

// MaxCachedClients bounds the client cache, so requests naming random client
// ids cannot grow it without limit.
const MaxCachedClients = 10000

// dummyRefresh is how often the cost of the dummy hash is read again from
// the stored users, so it follows "tokenpipe user add" runs with another
// TOKENPIPE_BCRYPT_COST.
const dummyRefresh = 5 * time.Minute

// Registry authenticates clients and users for the token endpoint. It is safe
// for concurrent use.
//
// Clients are cached for the TTL so the hot path does not query Postgres per
// request; a removed client (or one whose secret changed) keeps working on an
// issuer for at most the TTL, and a newly added one may be refused for as long
// if it was asked for just before. Entries expire lazily on lookup. While
// Postgres cannot be reached, the last known registration keeps answering.
// Users are not cached: bcrypt dominates the cost of the password grant.
type Registry struct {
	db  *pgxpool.Pool
	ttl time.Duration

	// The bcrypt hash compared when the user is unknown, of the highest
	// cost users are stored with; dummyAt is when that cost was read.
	dummyMu   sync.Mutex
	dummy     []byte
	dummyCost int
	dummyAt   time.Time

	mu    sync.Mutex
	cache map[string]cached
}

type cached struct {
	client  *Client // nil: known not to exist
	expires time.Time
}

// NewRegistry returns a registry whose client cache keeps entries for ttl;
// ttl <= 0 means DefaultCacheTTL.
func NewRegistry(db *pgxpool.Pool, ttl time.Duration) *Registry {
	if ttl <= 0 {
		ttl = DefaultCacheTTL
	}
	return &Registry{db: db, ttl: ttl, cache: map[string]cached{}}
}

// dummyDigest is compared when a client is unknown, so the answer takes the
// same time whether or not the id exists.
var dummyDigest = sha256.Sum256([]byte("tokenpipe: no such client"))

// Authenticate returns the client if secret is its secret, ErrInvalidClient
// if the client is unknown or the secret wrong (callers cannot and should not
// tell which), or another error if the registry could not be read.
func (r *Registry) Authenticate(ctx context.Context, id, secret string) (*Client, error) {
	var c *Client
	if validID("client id", id) == nil {
		var err error
		if c, err = r.client(ctx, id); err != nil {
			return nil, err
		}
	}
	given := sha256.Sum256([]byte(secret))
	want := dummyDigest
	if c != nil {
		want = c.SecretDigest
	}
	if subtle.ConstantTimeCompare(given[:], want[:]) != 1 || c == nil {
		return nil, ErrInvalidClient
	}
	return c, nil
}

func (r *Registry) client(ctx context.Context, id string) (*Client, error) {
	now := time.Now()
	r.mu.Lock()
	e, known := r.cache[id]
	r.mu.Unlock()
	if known && now.Before(e.expires) {
		return e.client, nil
	}
	var c Client
	var digest []byte
	err := r.db.QueryRow(ctx, `SELECT client_id, secret_digest, scopes, grants, introspect, rotation_window, created_at
		FROM clients WHERE client_id = $1`, id).
		Scan(&c.ID, &digest, &c.Scopes, &c.Grants, &c.Introspect, &c.RotationWindow, &c.CreatedAt)
	var found *Client
	switch {
	case errors.Is(err, pgx.ErrNoRows):
	case err != nil && known:
		// Postgres is unreachable: keep answering with the last known
		// registration, so an async issuer rides out a database outage.
		return e.client, nil
	case err != nil:
		return nil, fmt.Errorf("look up client: %w", err)
	default:
		copy(c.SecretDigest[:], digest)
		// A set, not a scan: a client may be allowed thousands of scopes
		// and every request checks each one it asks for.
		c.scopeSet = make(map[string]bool, len(c.Scopes))
		for _, sc := range c.Scopes {
			c.scopeSet[sc] = true
		}
		found = &c
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, present := r.cache[id]; !present && len(r.cache) >= MaxCachedClients {
		r.evict(now)
	}
	r.cache[id] = cached{client: found, expires: now.Add(r.ttl)}
	return found, nil
}

// Forget drops a client from this registry's cache, so a change this
// process made (a grant turned off) applies here at once rather than after
// the TTL. Other processes still apply it within their TTL.
func (r *Registry) Forget(id string) {
	r.mu.Lock()
	delete(r.cache, id)
	r.mu.Unlock()
}

// evict makes room in a full cache: expired entries go first; if none had
// expired, everything goes. Tracking recency is not worth it: a refill costs
// one query per client and happens at most once per MaxCachedClients misses.
// r.mu must be held.
func (r *Registry) evict(now time.Time) {
	for id, e := range r.cache {
		if !now.Before(e.expires) {
			delete(r.cache, id)
		}
	}
	if len(r.cache) >= MaxCachedClients {
		clear(r.cache)
	}
}

// dummyHash returns the hash compared when a user is unknown. It has the
// highest cost any stored hash has, so an unknown user costs as long as a
// known one with a wrong password: with one cost for all users (the usual
// case) exactly; after TOKENPIPE_BCRYPT_COST was raised, as long as the users
// hashed since, and never less, so unknown names are no cheaper to send than
// real ones. Reading the cost from the hashes, rather than from a setting
// the issuer would need too, cannot disagree with what "tokenpipe user add"
// stored. It is made on first need (an issuer that never sees the password
// grant never pays for it) and the cost is read again every dummyRefresh.
func (r *Registry) dummyHash(ctx context.Context) ([]byte, error) {
	r.dummyMu.Lock()
	defer r.dummyMu.Unlock()
	if r.dummy != nil && time.Since(r.dummyAt) < dummyRefresh {
		return r.dummy, nil
	}
	cost, err := r.storedCost(ctx)
	if err != nil {
		if r.dummy != nil {
			return r.dummy, nil // the last known cost, through an outage
		}
		return nil, err
	}
	r.dummyAt = time.Now()
	if r.dummy == nil || cost != r.dummyCost {
		hash, err := bcrypt.GenerateFromPassword([]byte("tokenpipe: no such user"), cost)
		if err != nil {
			return nil, fmt.Errorf("dummy password hash: %w", err)
		}
		r.dummy, r.dummyCost = hash, cost
	}
	return r.dummy, nil
}

// storedCost is the highest bcrypt cost of the stored users, or bcrypt's
// default if there are none. The cost is the two digits after the version
// ("$2a$12$..."); it is one scan of the users table every dummyRefresh.
func (r *Registry) storedCost(ctx context.Context) (int, error) {
	var cost *int
	err := r.db.QueryRow(ctx, `SELECT max(substring(password_hash FROM '^\$2[abxy]?\$([0-9]{2})\$')::int) FROM users`).Scan(&cost)
	if err != nil {
		return 0, fmt.Errorf("read the users' bcrypt cost: %w", err)
	}
	if cost == nil || *cost < bcrypt.MinCost || *cost > bcrypt.MaxCost {
		return bcrypt.DefaultCost, nil
	}
	return *cost, nil
}

// sawCost notes the cost of a known user's hash: a higher one than the
// dummy's means users were added at a higher cost since it was read, so the
// next unknown user reads it again rather than answering faster until the
// next refresh.
func (r *Registry) sawCost(hash string) {
	cost, err := bcrypt.Cost([]byte(hash))
	if err != nil {
		return
	}
	r.dummyMu.Lock()
	defer r.dummyMu.Unlock()
	if r.dummy != nil && cost > r.dummyCost {
		r.dummyAt = time.Time{}
	}
}

// compareDummy spends the time of a password check for a user that does not
// exist.
func (r *Registry) compareDummy(ctx context.Context, password string) error {
	dummy, err := r.dummyHash(ctx)
	if err != nil {
		return err
	}
	_ = bcrypt.CompareHashAndPassword(dummy, []byte(password))
	return ErrInvalidGrant
}

// VerifyUser checks a resource owner's password: nil if it is right,
// ErrInvalidGrant if the user is unknown or the password wrong (in the same
// time, as far as bcrypt goes), another error if the registry could not be
// read.
func (r *Registry) VerifyUser(ctx context.Context, username, password string) error {
	if validID("username", username) != nil {
		return r.compareDummy(ctx, password)
	}
	var hash string
	err := r.db.QueryRow(ctx, `SELECT password_hash FROM users WHERE username = $1`, username).Scan(&hash)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		return r.compareDummy(ctx, password)
	case err != nil:
		return fmt.Errorf("look up user: %w", err)
	}
	r.sawCost(hash)
	if bcrypt.CompareHashAndPassword([]byte(hash), []byte(password)) != nil {
		return ErrInvalidGrant
	}
	return nil
}
