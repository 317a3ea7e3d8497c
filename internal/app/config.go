package app

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/kelseyhightower/envconfig"

	"github.com/tokenpipe/tokenpipe/events"
)

const EnvPrefix = "TOKENPIPE"

// Common is the configuration every role shares.
type Common struct {
	NATSURL     string `envconfig:"NATS_URL" default:"nats://127.0.0.1:4222" desc:"NATS server URL(s), comma-separated"`
	NATSCreds   string `envconfig:"NATS_CREDS" desc:"NATS credentials file (JWT + nkey), optional"`
	NATSNKey    string `envconfig:"NATS_NKEY_FILE" desc:"NATS nkey seed file, optional"`
	NATSTLSCA   string `envconfig:"NATS_TLS_CA" desc:"CA bundle to verify the NATS server, optional"`
	NATSTLSCert string `envconfig:"NATS_TLS_CERT" desc:"client certificate for NATS mutual TLS, optional"`
	NATSTLSKey  string `envconfig:"NATS_TLS_KEY" desc:"client key for NATS mutual TLS, optional"`
	DatabaseURL string `envconfig:"DATABASE_URL" default:"postgres://postgres@127.0.0.1:5432/tokenpipe?sslmode=disable" desc:"Postgres URL (sslmode, sslrootcert, sslcert, sslkey go in the URL)"`
	DBMaxConns  int32  `envconfig:"DB_MAX_CONNS" default:"8" desc:"Postgres pool size"`

	Stream          string        `envconfig:"STREAM" default:"TOKENPIPE" desc:"JetStream stream name"`
	SubjectPrefix   string        `envconfig:"SUBJECT_PREFIX" default:"tokenpipe" desc:"subject prefix; the stream takes PREFIX.>"`
	StreamMaxAge    time.Duration `envconfig:"STREAM_MAX_AGE" default:"168h" desc:"how long events stay in the stream: the replay window"`
	StreamMaxBytes  int64         `envconfig:"STREAM_MAX_BYTES" default:"-1" desc:"stream size limit in bytes, -1 for none"`
	StreamReplicas  int           `envconfig:"STREAM_REPLICAS" default:"1" desc:"stream replicas (3 in a NATS cluster)"`
	DuplicateWindow time.Duration `envconfig:"DUPLICATE_WINDOW" default:"2m" desc:"Nats-Msg-Id deduplication window"`
	PersisterName   string        `envconfig:"PERSISTER_CONSUMER" default:"persister" desc:"durable consumer of the persister pool"`
	RecoveryName    string        `envconfig:"RECOVERY_CONSUMER" default:"recovery" desc:"durable consumer of the recovery role"`
	AckWait         time.Duration `envconfig:"ACK_WAIT" default:"30s" desc:"time a delivered event may stay unacknowledged before redelivery"`
	MaxAckPending   int           `envconfig:"MAX_ACK_PENDING" default:"20000" desc:"in-flight events per consumer, across all pods"`
	Partitions      int           `envconfig:"PARTITIONS" default:"1" desc:"split the issued subject by a hash of the token's key into this many partitions, each with its own persister consumer (PERSISTER_CONSUMER-pN); every role must agree; 1: one subject, no partitions"`

	OpsAddr         string        `envconfig:"OPS_ADDR" default:":9090" desc:"address for /metrics, /healthz and /readyz; empty to disable"`
	Pprof           bool          `envconfig:"PPROF" default:"false" desc:"serve /debug/pprof on the ops address"`
	LogLevel        string        `envconfig:"LOG_LEVEL" default:"info" desc:"debug, info, warn or error"`
	LogFormat       string        `envconfig:"LOG_FORMAT" default:"json" desc:"json or text"`
	ShutdownTimeout time.Duration `envconfig:"SHUTDOWN_TIMEOUT" default:"25s" desc:"longest graceful drain after SIGTERM"`
}

// Topology is the stream layout the Common settings describe.
func (c *Common) Topology() events.Topology {
	return events.Topology{
		Stream:     c.Stream,
		Prefix:     c.SubjectPrefix,
		MaxAge:     c.StreamMaxAge,
		MaxBytes:   c.StreamMaxBytes,
		Replicas:   c.StreamReplicas,
		Duplicates: c.DuplicateWindow,
		Persister:  c.PersisterName,
		Recovery:   c.RecoveryName,
		AckWait:    c.AckWait,
		MaxPending: c.MaxAckPending,
		Partitions: c.Partitions,
	}
}

// validate checks what envconfig's types cannot, naming the variable.
func (c *Common) validate() error {
	if c.LogLevel != "" {
		var l slog.Level
		if err := l.UnmarshalText([]byte(c.LogLevel)); err != nil {
			return fmt.Errorf("%s_LOG_LEVEL: %q is not one of debug, info, warn, error", EnvPrefix, c.LogLevel)
		}
	}
	checks := []struct {
		bad  bool
		name string
		msg  string
	}{
		{c.LogFormat != "json" && c.LogFormat != "text", "LOG_FORMAT", "must be json or text"},
		{c.NATSURL == "", "NATS_URL", "is empty"},
		{c.DatabaseURL == "", "DATABASE_URL", "is empty"},
		{c.DBMaxConns < 1, "DB_MAX_CONNS", "must be at least 1"},
		{c.Stream == "" || strings.ContainsAny(c.Stream, ". *>"), "STREAM", "must be a non-empty name without '.', '*', '>' or spaces"},
		{c.SubjectPrefix == "" || strings.ContainsAny(c.SubjectPrefix, " *>"), "SUBJECT_PREFIX", "must be a non-empty subject without wildcards"},
		{c.StreamMaxAge < 0, "STREAM_MAX_AGE", "must not be negative"},
		{c.StreamReplicas < 1 || c.StreamReplicas > 5, "STREAM_REPLICAS", "must be between 1 and 5"},
		{c.AckWait < time.Second, "ACK_WAIT", "must be at least 1s"},
		{c.MaxAckPending < 1, "MAX_ACK_PENDING", "must be at least 1"},
		{c.Partitions < 1 || c.Partitions > events.MaxPartitions, "PARTITIONS", fmt.Sprintf("must be between 1 and %d", events.MaxPartitions)},
		{c.ShutdownTimeout <= 0, "SHUTDOWN_TIMEOUT", "must be positive"},
	}
	for _, ch := range checks {
		if ch.bad {
			return fmt.Errorf("%s_%s: %s", EnvPrefix, ch.name, ch.msg)
		}
	}
	return nil
}

// validator is implemented by role configs with their own checks.
type validator interface{ validate() error }

// LoadConfig fills cfg from the environment and, if fs is given, parses the
// command's flags with it. -h as the first argument prints the variables
// (and the flags) and returns ErrHelp. On a bad value it returns one line
// naming the variable.
func LoadConfig(name string, args []string, stderr io.Writer, cfg any, positional string, fs ...*flag.FlagSet) ([]string, error) {
	return LoadConfigWith(name, args, stderr, cfg, positional, nil, fs...)
}

// LoadConfigWith is LoadConfig with preset run after the environment was
// read and before validation: a command's own defaults, given as values
// (the demo's), for variables the environment does not set.
func LoadConfigWith(name string, args []string, stderr io.Writer, cfg any, positional string, preset func(), fs ...*flag.FlagSet) ([]string, error) {
	help := func() {
		printEnvUsage(stderr, name, positional, cfg)
		if len(fs) > 0 {
			fmt.Fprintln(stderr, "\nFlags:")
			fs[0].SetOutput(stderr)
			fs[0].PrintDefaults()
		}
	}
	if len(args) > 0 && (args[0] == "-h" || args[0] == "-help" || args[0] == "--help") {
		help()
		return nil, ErrHelp
	}
	if err := envconfig.Process(EnvPrefix, cfg); err != nil {
		return nil, configError(err)
	}
	if preset != nil {
		preset()
	}
	if v, ok := cfg.(validator); ok {
		if err := v.validate(); err != nil {
			return nil, err
		}
	}
	if len(fs) == 0 {
		return args, nil
	}
	fs[0].SetOutput(stderr)
	fs[0].Usage = help
	if err := fs[0].Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil, ErrHelp
		}
		return nil, ErrUsage
	}
	return fs[0].Args(), nil
}

// ErrHelp means -h was given and usage printed: exit 0.
var ErrHelp = errors.New("help requested")

// configError turns envconfig's error into one line naming the variable.
func configError(err error) error {
	var pe *envconfig.ParseError
	if errors.As(err, &pe) {
		return fmt.Errorf("%s: cannot use %q as %s: %v", pe.KeyName, pe.Value, pe.TypeName, pe.Err)
	}
	return fmt.Errorf("configuration: %v", err)
}

func printEnvUsage(w io.Writer, name, positional string, cfg any) {
	fmt.Fprintf(w, "usage: tokenpipe %s %s\n\nEnvironment:\n", name, positional)
	tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
	_ = envconfig.Usagef(EnvPrefix, cfg, tw, "{{range .}}  {{usage_key .}}\t{{usage_default .}}\t{{usage_description .}}\n{{end}}")
	_ = tw.Flush()
}

// NewLogger builds the structured logger every role writes to stderr.
func NewLogger(c *Common, w io.Writer) *slog.Logger {
	var level slog.Level
	_ = level.UnmarshalText([]byte(c.LogLevel))
	opts := &slog.HandlerOptions{Level: level}
	if c.LogFormat == "text" {
		return slog.New(slog.NewTextHandler(w, opts))
	}
	return slog.New(slog.NewJSONHandler(w, opts))
}

// instanceName identifies this process in events and logs.
func instanceName() string {
	h, err := os.Hostname()
	if err != nil {
		return fmt.Sprintf("pid-%d", os.Getpid())
	}
	return fmt.Sprintf("%s-%d", h, os.Getpid())
}
