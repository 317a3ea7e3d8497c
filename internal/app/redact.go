package app

import "regexp"

// The secrets a connection string can hold, for RedactURL.
var (
	// scheme://user:PASSWORD@ in a URL, or in each URL of a list. When the
	// URL is malformed the password may hold spaces, or unencoded '/' (a
	// base64 password) and '@' (the last '@' before the host ends it).
	urlPassword = regexp.MustCompile(`(://[^:/?#@\s,]*:)(?:[^@/]*|[^@\s]*)@(?:[^@/\s,]*@)*`)
	// nats://TOKEN@: NATS takes a lone user part as a token; it too may
	// hold an unencoded '/'.
	natsToken = regexp.MustCompile(`((?:nats|tls|ws|wss)://)[^:?#@\s,]+@`)
	// ?password=... or &sslpassword=... in a URL's query.
	queryPassword = regexp.MustCompile(`(?i)([?&](?:ssl)?password=)[^&#\s]*`)
	// password=... in a key=value connection string, quoted or not.
	dsnPassword = regexp.MustCompile(`(?i)((?:^|\s)(?:ssl)?password\s*=\s*)('(?:[^'\\]|\\.)*'|\S*)`)
)

// RedactURL hides the credentials in a connection string before it reaches
// a log line or an error: passwords in URLs (also in comma-separated lists,
// and in unparseable ones), NATS tokens, password query parameters, and
// password=... in Postgres key=value strings. Everything else stays, so the
// message still says where the connection went. It works on text, not on a
// parsed URL, so it also cleans error messages that quote a URL.
func RedactURL(s string) string {
	s = urlPassword.ReplaceAllString(s, "${1}xxxxx@")
	s = natsToken.ReplaceAllString(s, "${1}xxxxx@")
	s = queryPassword.ReplaceAllString(s, "${1}xxxxx")
	return dsnPassword.ReplaceAllString(s, "${1}xxxxx")
}

// redactedError is an error whose message went through RedactURL; errors.Is
// and errors.As still see the original.
type redactedError struct {
	msg string
	err error
}

func (e *redactedError) Error() string { return e.msg }
func (e *redactedError) Unwrap() error { return e.err }

// RedactErr is for errors from libraries that may quote the connection
// string they were given (net/url's parse errors do).
func RedactErr(err error) error {
	if err == nil {
		return nil
	}
	if msg := RedactURL(err.Error()); msg != err.Error() {
		return &redactedError{msg: msg, err: err}
	}
	return err
}
