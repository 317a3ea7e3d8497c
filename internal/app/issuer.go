package app

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/clients"
	"github.com/tokenpipe/tokenpipe/internal/ops"
	"github.com/tokenpipe/tokenpipe/internal/proxy"
	"github.com/tokenpipe/tokenpipe/internal/throttle"
	"github.com/tokenpipe/tokenpipe/internal/tokens"
	"github.com/tokenpipe/tokenpipe/issuer"
)

// IssuerConfig configures the token endpoint.
type IssuerConfig struct {
	Common
	HTTPAddr            string        `envconfig:"HTTP_ADDR" default:":8080" desc:"address of the OAuth2 token endpoint"`
	Mode                string        `envconfig:"MODE" default:"async" desc:"async: answer after JetStream has the event; sync: write the row in the request (no NATS)"`
	TokenTTL            time.Duration `envconfig:"TOKEN_TTL" default:"1h" desc:"access token lifetime"`
	RefreshTTL          time.Duration `envconfig:"REFRESH_TTL" default:"720h" desc:"refresh token lifetime"`
	TokenKeys           string        `envconfig:"TOKEN_KEYS" desc:"required: comma-separated token signing keys (hex or base64, 32+ bytes; the first signs, all verify); every issuer must share them; make one with 'tokenpipe keygen'"`
	CoalesceWindow      time.Duration `envconfig:"COALESCE_WINDOW" default:"5s" desc:"identical token requests (client, user, scope, grant) within one window get the same token; 0 disables"`
	RefreshGrace        time.Duration `envconfig:"REFRESH_GRACE" default:"5s" desc:"concurrent redemptions of one refresh token within this long get the same new pair; later ones are reuse and revoke the family; 0 for none"`
	RotationWindow      time.Duration `envconfig:"ROTATION_WINDOW" default:"5s" desc:"per-request rotation (token exchange): the exchanged token stays valid this long after its first answered exchange, and exchanges within it get the same successor; 0 for none"`
	RotationReuseKeeps  bool          `envconfig:"ROTATION_REUSE_KEEPS" default:"false" desc:"an exchange after the rotation window is only refused; false: it is reuse and revokes the token's family"`
	IntrospectCacheTTL  time.Duration `envconfig:"INTROSPECT_CACHE_TTL" default:"5s" desc:"longest reuse of a positive introspection answer (revocation notices end it sooner); 0 disables the cache"`
	IntrospectCacheSize int           `envconfig:"INTROSPECT_CACHE_SIZE" default:"100000" desc:"most cached introspection answers"`
	AdminToken          string        `envconfig:"ADMIN_TOKEN" desc:"bearer token for the /admin management API; empty disables it"`
	AdminUsers          string        `envconfig:"ADMIN_USERS" desc:"comma-separated users who may sign in to the /admin pages with their own password; empty disables the pages"`
	PageSessionIdle     time.Duration `envconfig:"PAGE_SESSION_IDLE" default:"30m" desc:"a signed-in /account or /admin page session ends after this long unused (and 12h after sign-in in any case)"`
	PublishTimeout      time.Duration `envconfig:"PUBLISH_TIMEOUT" default:"2s" desc:"longest wait for JetStream's ack before answering 503"`
	PublishWindow       time.Duration `envconfig:"PUBLISH_WINDOW" default:"1ms" desc:"while requests come faster than one per window, gather their publishes this long and send them in one write (less CPU per token for the issuer and NATS, the window added to the answers' latency); 0 sends each at once"`
	PublishMaxInFlight  int           `envconfig:"PUBLISH_MAX_INFLIGHT" default:"4096" desc:"most unacknowledged publishes shared by all requests"`
	SyncConflictRetries int           `envconfig:"SYNC_CONFLICT_RETRIES" default:"5" desc:"sync mode: retries when a concurrent request wins the race for a key"`
	ClientCacheTTL      time.Duration `envconfig:"CLIENT_CACHE_TTL" default:"30s" desc:"how long a client's registration is cached; a removed client works this long"`
	Instance            string        `envconfig:"INSTANCE" desc:"name of this issuer in events and logs (default: hostname-pid)"`
	MaxBodyBytes        int64         `envconfig:"MAX_BODY_BYTES" default:"8192" desc:"largest accepted request body"`
	RequireTLS          bool          `envconfig:"REQUIRE_TLS" default:"false" desc:"refuse requests not over TLS on every endpoint but the metadata: served here (TLS_CERT_FILE) or X-Forwarded-Proto: https from a TRUSTED_PROXIES address"`
	TLSCertFile         string        `envconfig:"TLS_CERT_FILE" desc:"PEM certificate chain: serve HTTPS (TLS 1.2+) on HTTP_ADDR; a changed file is reloaded without restart"`
	TLSKeyFile          string        `envconfig:"TLS_KEY_FILE" desc:"PEM private key of TLS_CERT_FILE"`
	IssuerURL           string        `envconfig:"ISSUER_URL" desc:"RFC 8414 issuer identifier, the public https URL of this service (http only for a loopback host); empty: /.well-known/oauth-authorization-server answers 404"`

	TrustedProxies          string        `envconfig:"TRUSTED_PROXIES" desc:"comma-separated CIDRs of reverse proxies (CIDRs or IPs): their X-Forwarded-Proto is believed, and their X-Forwarded-For names the client for sign-in throttling; empty: none, the TCP peer is the client"`
	LoginFailuresUserSource int           `envconfig:"LOGIN_FAILURES_PER_USER_SOURCE" default:"5" desc:"wrong passwords for one user from one address before each further try backs off"`
	LoginFailuresUser       int           `envconfig:"LOGIN_FAILURES_PER_USER" default:"20" desc:"wrong passwords for one user from all addresses before new addresses back off (addresses the user signed in from are spared)"`
	LoginFailuresSource     int           `envconfig:"LOGIN_FAILURES_PER_SOURCE" default:"50" desc:"wrong passwords from one address, any user, before it backs off"`
	LoginBackoff            time.Duration `envconfig:"LOGIN_BACKOFF" default:"1s" desc:"first sign-in back-off; doubles with each further failure"`
	LoginBackoffMax         time.Duration `envconfig:"LOGIN_BACKOFF_MAX" default:"15m" desc:"longest sign-in back-off"`
	LoginFailureMemory      time.Duration `envconfig:"LOGIN_FAILURE_MEMORY" default:"1h" desc:"how long failed sign-ins are remembered after the last one"`
	LoginTracked            int           `envconfig:"LOGIN_TRACKED" default:"100000" desc:"most users and addresses the sign-in throttle tracks (about 300 bytes each); the least recently seen go first"`
	PasswordChecks          int           `envconfig:"PASSWORD_CHECKS" default:"0" desc:"bcrypt password checks running at once; 0: half the CPUs, rounded up"`
	PasswordCheckWait       time.Duration `envconfig:"PASSWORD_CHECK_WAIT" default:"500ms" desc:"longest wait for a free password check before answering 503; 0: no wait"`
}

func (c *IssuerConfig) validate() error {
	if err := c.Common.validate(); err != nil {
		return err
	}
	switch {
	case c.Mode != issuer.ModeAsync && c.Mode != issuer.ModeSync:
		return fmt.Errorf("%s_MODE: %q is not async or sync", EnvPrefix, c.Mode)
	case c.TokenTTL < time.Second:
		return fmt.Errorf("%s_TOKEN_TTL: must be at least 1s", EnvPrefix)
	case c.RefreshTTL < time.Second:
		return fmt.Errorf("%s_REFRESH_TTL: must be at least 1s", EnvPrefix)
	case c.ClientCacheTTL <= 0:
		return fmt.Errorf("%s_CLIENT_CACHE_TTL: must be positive", EnvPrefix)
	case c.PublishTimeout <= 0:
		return fmt.Errorf("%s_PUBLISH_TIMEOUT: must be positive", EnvPrefix)
	case c.PublishWindow < 0 || c.PublishWindow > time.Second:
		return fmt.Errorf("%s_PUBLISH_WINDOW: must be between 0s and 1s", EnvPrefix)
	case c.PublishMaxInFlight < 1:
		return fmt.Errorf("%s_PUBLISH_MAX_INFLIGHT: must be at least 1", EnvPrefix)
	case c.SyncConflictRetries < 0:
		return fmt.Errorf("%s_SYNC_CONFLICT_RETRIES: must not be negative", EnvPrefix)
	case c.MaxBodyBytes < 256:
		return fmt.Errorf("%s_MAX_BODY_BYTES: must be at least 256", EnvPrefix)
	case c.HTTPAddr == "":
		return fmt.Errorf("%s_HTTP_ADDR: is empty", EnvPrefix)
	case c.TokenKeys == "":
		return fmt.Errorf("%s_TOKEN_KEYS: is empty; generate a key with 'tokenpipe keygen' and give every issuer the same one", EnvPrefix)
	case c.CoalesceWindow < 0:
		return fmt.Errorf("%s_COALESCE_WINDOW: must not be negative", EnvPrefix)
	case c.Mode == issuer.ModeAsync && c.CoalesceWindow >= c.DuplicateWindow:
		return fmt.Errorf("%s_COALESCE_WINDOW: %s must be shorter than %s_DUPLICATE_WINDOW (%s), which lets JetStream keep one event per coalesced token", EnvPrefix, c.CoalesceWindow, EnvPrefix, c.DuplicateWindow)
	case c.RefreshGrace < 0 || c.RefreshGrace > 5*time.Minute:
		return fmt.Errorf("%s_REFRESH_GRACE: must be between 0 and 5m", EnvPrefix)
	case c.Mode == issuer.ModeAsync && c.RefreshGrace >= c.DuplicateWindow:
		return fmt.Errorf("%s_REFRESH_GRACE: %s must be shorter than %s_DUPLICATE_WINDOW (%s)", EnvPrefix, c.RefreshGrace, EnvPrefix, c.DuplicateWindow)
	case c.RotationWindow < 0 || c.RotationWindow > 5*time.Minute:
		return fmt.Errorf("%s_ROTATION_WINDOW: must be between 0 and 5m", EnvPrefix)
	case c.Mode == issuer.ModeAsync && c.RotationWindow >= c.DuplicateWindow:
		return fmt.Errorf("%s_ROTATION_WINDOW: %s must be shorter than %s_DUPLICATE_WINDOW (%s), which lets JetStream keep one event per successor", EnvPrefix, c.RotationWindow, EnvPrefix, c.DuplicateWindow)
	case c.IntrospectCacheTTL < 0:
		return fmt.Errorf("%s_INTROSPECT_CACHE_TTL: must not be negative", EnvPrefix)
	case c.IntrospectCacheSize < 1:
		return fmt.Errorf("%s_INTROSPECT_CACHE_SIZE: must be at least 1", EnvPrefix)
	case c.AdminToken != "" && len(c.AdminToken) < 16:
		return fmt.Errorf("%s_ADMIN_TOKEN: must be at least 16 characters", EnvPrefix)
	case c.PageSessionIdle < time.Minute || c.PageSessionIdle > 12*time.Hour:
		return fmt.Errorf("%s_PAGE_SESSION_IDLE: must be between 1m and 12h", EnvPrefix)
	case c.LoginFailuresUserSource < 1:
		return fmt.Errorf("%s_LOGIN_FAILURES_PER_USER_SOURCE: must be at least 1", EnvPrefix)
	case c.LoginFailuresUser < c.LoginFailuresUserSource:
		return fmt.Errorf("%s_LOGIN_FAILURES_PER_USER: must be at least %s_LOGIN_FAILURES_PER_USER_SOURCE (%d)", EnvPrefix, EnvPrefix, c.LoginFailuresUserSource)
	case c.LoginFailuresSource < c.LoginFailuresUserSource:
		return fmt.Errorf("%s_LOGIN_FAILURES_PER_SOURCE: must be at least %s_LOGIN_FAILURES_PER_USER_SOURCE (%d)", EnvPrefix, EnvPrefix, c.LoginFailuresUserSource)
	case c.LoginBackoff <= 0:
		return fmt.Errorf("%s_LOGIN_BACKOFF: must be positive", EnvPrefix)
	case c.LoginBackoffMax < c.LoginBackoff:
		return fmt.Errorf("%s_LOGIN_BACKOFF_MAX: must be at least %s_LOGIN_BACKOFF (%s)", EnvPrefix, EnvPrefix, c.LoginBackoff)
	case c.LoginFailureMemory < c.LoginBackoffMax:
		// Forgetting failures before the longest back-off ends would give a
		// patient guesser a fresh set of free tries after every one.
		return fmt.Errorf("%s_LOGIN_FAILURE_MEMORY: must be at least %s_LOGIN_BACKOFF_MAX (%s)", EnvPrefix, EnvPrefix, c.LoginBackoffMax)
	case c.LoginTracked < 1000:
		return fmt.Errorf("%s_LOGIN_TRACKED: must be at least 1000", EnvPrefix)
	case c.PasswordChecks < 0:
		return fmt.Errorf("%s_PASSWORD_CHECKS: must not be negative", EnvPrefix)
	case c.PasswordCheckWait < 0:
		return fmt.Errorf("%s_PASSWORD_CHECK_WAIT: must not be negative", EnvPrefix)
	}
	for _, u := range c.adminUsers() {
		if err := clients.ValidUsername(u); err != nil {
			return fmt.Errorf("%s_ADMIN_USERS: %v", EnvPrefix, err)
		}
	}
	if _, err := proxy.Parse(c.TrustedProxies); err != nil {
		return fmt.Errorf("%s_TRUSTED_PROXIES: %v", EnvPrefix, err)
	}
	if _, err := tokens.ParseKeys(c.TokenKeys); err != nil {
		return fmt.Errorf("%s_TOKEN_KEYS: %v", EnvPrefix, err)
	}
	if c.IssuerURL != "" {
		if err := issuer.ValidateIssuerURL(c.IssuerURL); err != nil {
			return fmt.Errorf("%s_ISSUER_URL: %q %v", EnvPrefix, c.IssuerURL, err)
		}
	}
	switch {
	case c.TLSCertFile == "" && c.TLSKeyFile != "":
		return fmt.Errorf("%s_TLS_CERT_FILE: is empty but %s_TLS_KEY_FILE is set; give both or neither", EnvPrefix, EnvPrefix)
	case c.TLSCertFile != "" && c.TLSKeyFile == "":
		return fmt.Errorf("%s_TLS_KEY_FILE: is empty but %s_TLS_CERT_FILE is set; give both or neither", EnvPrefix, EnvPrefix)
	case c.TLSCertFile != "":
		if _, err := tls.LoadX509KeyPair(c.TLSCertFile, c.TLSKeyFile); err != nil {
			return fmt.Errorf("%s_TLS_CERT_FILE: %v", EnvPrefix, oneLine(err))
		}
	}
	return nil
}

// oneLine keeps a configuration error on a single line.
func oneLine(err error) string {
	return strings.Join(strings.Fields(err.Error()), " ")
}

// offIfZero maps the command line's "0 disables" to issuer.Config's
// negative-means-off (zero there means the default).
func offIfZero(d time.Duration) time.Duration {
	if d == 0 {
		return -1
	}
	return d
}

// issuerConfig assumes validate passed.
func (c *IssuerConfig) IssuerSettings(topo events.Topology) issuer.Config {
	keys, _ := tokens.ParseKeys(c.TokenKeys)
	trusted, _ := proxy.Parse(c.TrustedProxies)
	return issuer.Config{
		TLSCertFile: c.TLSCertFile, TLSKeyFile: c.TLSKeyFile, IssuerURL: c.IssuerURL,
		Mode: c.Mode, TokenTTL: c.TokenTTL, RefreshTTL: c.RefreshTTL, PublishTimeout: c.PublishTimeout, PublishWindow: c.PublishWindow,
		MaxInFlight: c.PublishMaxInFlight, SyncConflictRetries: c.SyncConflictRetries, Instance: c.instance(),
		MaxBodyBytes: c.MaxBodyBytes, RequireTLS: c.RequireTLS, Topology: topo,
		Keys: keys, CoalesceWindow: offIfZero(c.CoalesceWindow), RefreshGrace: offIfZero(c.RefreshGrace),
		RotationWindow: offIfZero(c.RotationWindow), RotationReuseKeeps: c.RotationReuseKeeps,
		IntrospectCacheTTL: offIfZero(c.IntrospectCacheTTL), IntrospectCacheSize: c.IntrospectCacheSize,
		AdminToken: c.AdminToken, AdminUsers: c.adminUsers(), PageSessionIdle: c.PageSessionIdle,
		Login: throttle.Config{
			PerUserSource: c.LoginFailuresUserSource, PerUser: c.LoginFailuresUser, PerSource: c.LoginFailuresSource,
			Backoff: c.LoginBackoff, MaxBackoff: c.LoginBackoffMax, Memory: c.LoginFailureMemory, MaxEntries: c.LoginTracked,
		},
		PasswordChecks: c.PasswordChecks, PasswordCheckWait: offIfZero(c.PasswordCheckWait),
		TrustedProxies: trusted,
	}
}

// adminUsers splits ADMIN_USERS, ignoring blanks around the commas.
func (c *IssuerConfig) adminUsers() []string {
	var out []string
	for _, u := range strings.Split(c.AdminUsers, ",") {
		if u = strings.TrimSpace(u); u != "" {
			out = append(out, u)
		}
	}
	return out
}

func (c *IssuerConfig) instance() string {
	if c.Instance != "" {
		return c.Instance
	}
	return instanceName()
}

const issuerUsage = `[-h]

Serves on TOKENPIPE_HTTP_ADDR:
  POST /oauth2/token       RFC 6749: client_credentials, password, refresh_token;
                           RFC 8693 token exchange (per-request rotation)
  POST /oauth2/revoke      RFC 7009
  POST /oauth2/introspect  RFC 7662
  GET  /.well-known/oauth-authorization-server  RFC 8414 metadata (needs
                           TOKENPIPE_ISSUER_URL; 404 without it)
  /account/applications    users list and remove applications (HTTP Basic)
  /admin/...               management API (Bearer TOKENPIPE_ADMIN_TOKEN)
  GET  /account            My applications: users sign in, see and remove
                           the applications holding their tokens
  GET  /admin              administration pages, for TOKENPIPE_ADMIN_USERS
and /metrics, /healthz, /readyz on TOKENPIPE_OPS_ADDR. Clients authenticate
by HTTP Basic or client_secret_post.

In async mode a token is returned only after JetStream acknowledged its event;
persister workers write the rows. In sync mode the row is written inside the
request and NATS is not used.

Examples:
  tokenpipe issuer
  TOKENPIPE_MODE=sync TOKENPIPE_HTTP_ADDR=:8443 TOKENPIPE_REQUIRE_TLS=true \
    TOKENPIPE_TLS_CERT_FILE=tls.crt TOKENPIPE_TLS_KEY_FILE=tls.key \
    TOKENPIPE_ISSUER_URL=https://auth.example.com tokenpipe issuer
  TOKENPIPE_REQUIRE_TLS=true TOKENPIPE_TRUSTED_PROXIES=10.0.0.0/8 tokenpipe issuer`

func RunIssuer(ctx context.Context, args []string, _, stderr io.Writer) error {
	var cfg IssuerConfig
	rest, err := LoadConfig("issuer", args, stderr, &cfg, issuerUsage)
	if err != nil {
		return HelpIsNil(err)
	}
	if len(rest) != 0 {
		fmt.Fprintf(stderr, "tokenpipe issuer takes no arguments (got %q); see tokenpipe issuer -h\n", rest)
		return ErrUsage
	}
	icfg := cfg.IssuerSettings(cfg.Topology())
	log := NewLogger(&cfg.Common, stderr).With("role", "issuer", "instance", icfg.Instance)
	srv := ops.NewServer(log)
	srv.Profiling = cfg.Pprof
	pool, err := ConnectPostgresAs(ctx, &cfg.Common, "tokenpipe-issuer")
	if err != nil {
		return err
	}
	defer pool.Close()
	pc := PipelineConfig{
		Issuer: &icfg, Clients: clients.NewRegistry(pool, cfg.ClientCacheTTL), Addr: cfg.HTTPAddr,
		IssuerGrace: cfg.ShutdownTimeout, Metrics: srv.Registry, Log: log,
	}
	var js jetstream.JetStream
	if cfg.Mode == issuer.ModeAsync {
		nc, _, err := ConnectNATS(&cfg.Common, "tokenpipe-issuer", log, newConnMetrics(srv.Registry))
		if err != nil {
			return err
		}
		// Runs after the HTTP server stopped: every request's publish was
		// awaited, so Drain only flushes and closes.
		defer drainNATS(nc, cfg.ShutdownTimeout, log)
		if js, err = issuer.NewJetStream(nc, icfg); err != nil {
			return err
		}
		if _, err := events.Provision(ctx, js, icfg.Topology); err != nil {
			return err
		}
		srv.AddCheck(natsCheck(nc))
		pc.NC = nc
	} else {
		// Only sync mode needs Postgres for every token. In async mode the
		// issuer keeps issuing through a database outage (clients are cached),
		// so a Postgres failure must not take it out of its Service.
		srv.AddCheck(pgCheck(pool))
	}

	// The ops server outlives the token endpoint so /readyz can report the
	// drain while in-flight requests finish.
	opsCtx, stopOps := context.WithCancel(context.WithoutCancel(ctx))
	opsDone := make(chan struct{})
	go func() {
		defer close(opsDone)
		if err := srv.Serve(opsCtx, cfg.OpsAddr); err != nil {
			log.Error("ops server failed", "err", err)
		}
	}()
	defer func() { stopOps(); <-opsDone }()

	// On SIGTERM: fail readiness first, then stop the token endpoint, so the
	// drain is visible before connections are refused.
	serveCtx, stopServe := context.WithCancel(context.WithoutCancel(ctx))
	defer stopServe()
	pl := StartPipeline(serveCtx, pool, js, pc)
	watched := make(chan struct{})
	go func() {
		defer close(watched)
		select {
		case <-ctx.Done():
			srv.SetDraining()
			log.Info("draining", "grace", cfg.ShutdownTimeout)
			stopServe()
		case <-pl.Stopped(): // Serve failed on its own
		}
	}()
	err = pl.Wait()
	stopServe()
	<-watched
	return err
}

// drainNATS flushes and closes the connection, waiting at most grace.
func drainNATS(nc *nats.Conn, grace time.Duration, log *slog.Logger) {
	if err := nc.Drain(); err != nil {
		log.Warn("nats drain", "err", err)
		nc.Close()
		return
	}
	deadline := time.Now().Add(grace)
	for !nc.IsClosed() {
		if time.Now().After(deadline) {
			log.Warn("nats drain did not finish in time; closing", "grace", grace)
			nc.Close()
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}
