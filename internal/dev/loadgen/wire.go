package loadgen

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"strconv"
	"sync"
	"time"
)

// The generator's own cost is part of what the benchmark measures (it shares
// the two cores with the service), so it does not use net/http's client for
// the token requests: a Transport request costs a goroutine hand-off each
// way, a context with a deadline, header maps and a stack to grow, about 120
// µs of CPU per request here. wireClient writes each request as bytes built
// once per endpoint and reads the answer with the standard response parser,
// over keep-alive connections it owns.

// requestTimeout bounds one request, as the net/http client's Timeout did.
const requestTimeout = 10 * time.Second

// endpoint is one token URL with its request head, built once.
type endpoint struct {
	addr string // host:port to dial
	tls  *tls.Config
	head []byte // request line and headers up to Content-Length's value
	idle chan *wireConn
}

type wireConn struct {
	c      net.Conn
	br     *bufio.Reader
	buf    []byte
	reused bool
}

// wireClient sends client_credentials requests to the endpoints of a Target.
type wireClient struct {
	mu    sync.Mutex
	eps   map[string]*endpoint
	open  map[*wireConn]struct{}
	max   int
	creds string // base64 of the Basic credentials
}

func newWireClient(t Target, maxConns int) *wireClient {
	user := url.QueryEscape(t.ClientID) + ":" + url.QueryEscape(t.Secret)
	return &wireClient{eps: map[string]*endpoint{}, open: map[*wireConn]struct{}{}, max: maxConns,
		creds: base64.StdEncoding.EncodeToString([]byte(user))}
}

func (w *wireClient) endpoint(raw string) (*endpoint, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if ep, ok := w.eps[raw]; ok {
		return ep, nil
	}
	u, err := url.Parse(raw)
	if err != nil {
		return nil, fmt.Errorf("token URL: %w", err)
	}
	ep := &endpoint{addr: u.Host, idle: make(chan *wireConn, w.max)}
	switch u.Scheme {
	case "http":
		if u.Port() == "" {
			ep.addr = net.JoinHostPort(u.Hostname(), "80")
		}
	case "https":
		if u.Port() == "" {
			ep.addr = net.JoinHostPort(u.Hostname(), "443")
		}
		ep.tls = &tls.Config{ServerName: u.Hostname(), MinVersion: tls.VersionTLS12}
	default:
		return nil, fmt.Errorf("token URL %q: scheme must be http or https", raw)
	}
	ep.head = fmt.Appendf(nil, "POST %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: tokenpipe-loadgen\r\nAuthorization: Basic %s\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: ",
		u.RequestURI(), u.Host, w.creds)
	w.eps[raw] = ep
	return ep, nil
}

// closeAll closes every connection, idle or in use: requests in flight fail.
func (w *wireClient) closeAll() {
	w.mu.Lock()
	defer w.mu.Unlock()
	for c := range w.open {
		c.c.Close()
	}
	clear(w.open)
	for _, ep := range w.eps {
		for {
			select {
			case <-ep.idle:
				continue
			default:
			}
			break
		}
	}
}

func (w *wireClient) dial(ep *endpoint) (*wireConn, error) {
	c, err := net.DialTimeout("tcp", ep.addr, requestTimeout)
	if err != nil {
		return nil, err
	}
	if ep.tls != nil {
		tc := tls.Client(c, ep.tls)
		if err := tc.Handshake(); err != nil {
			c.Close()
			return nil, err
		}
		c = tc
	}
	wc := &wireConn{c: c, br: bufio.NewReaderSize(c, 4096), buf: make([]byte, 0, 512)}
	w.mu.Lock()
	w.open[wc] = struct{}{}
	w.mu.Unlock()
	return wc, nil
}

func (w *wireClient) discard(wc *wireConn) {
	wc.c.Close()
	w.mu.Lock()
	delete(w.open, wc)
	w.mu.Unlock()
}

// tokenRequest asks target for a token of scope; it returns the token, or the
// kind of error ("timeout", "transport", "HTTP <status> <error>").
func (w *wireClient) tokenRequest(target, scope string) (token, errKind string) {
	ep, err := w.endpoint(target)
	if err != nil {
		return "", "request"
	}
	body := "grant_type=client_credentials&scope=" + url.QueryEscape(scope)
	for attempt := 0; ; attempt++ {
		var wc *wireConn
		select {
		case wc = <-ep.idle:
		default:
			if wc, err = w.dial(ep); err != nil {
				return "", errKindOf(err)
			}
		}
		status, tok, errCode, keep, err := wc.roundTrip(ep, body)
		if err != nil {
			w.discard(wc)
			// A kept-alive connection the server closed while idle fails
			// before any answer: send once more on a new one, as net/http's
			// Transport does.
			if wc.reused && attempt == 0 && (errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) || isReset(err)) {
				continue
			}
			return "", errKindOf(err)
		}
		wc.reused = true
		if keep {
			select {
			case ep.idle <- wc:
			default:
				w.discard(wc)
			}
		} else {
			w.discard(wc)
		}
		if status != http.StatusOK || tok == "" {
			return "", fmt.Sprintf("HTTP %d %s", status, errCode)
		}
		return tok, ""
	}
}

// roundTrip sends one request and reads its answer; keep is false when the
// connection must not be used again.
func (wc *wireConn) roundTrip(ep *endpoint, body string) (status int, token, errCode string, keep bool, err error) {
	if err := wc.c.SetDeadline(time.Now().Add(requestTimeout)); err != nil {
		return 0, "", "", false, err
	}
	b := append(wc.buf[:0], ep.head...)
	b = strconv.AppendInt(b, int64(len(body)), 10)
	b = append(b, "\r\n\r\n"...)
	b = append(b, body...)
	wc.buf = b
	if _, err := wc.c.Write(b); err != nil {
		return 0, "", "", false, err
	}
	status, data, closing, err := readAnswer(wc.br)
	if err != nil {
		return 0, "", "", false, err
	}
	token, errCode = parseTokenAnswer(data)
	return status, token, errCode, !closing, nil
}

// readAnswer reads one HTTP/1.1 response: its status, its body (at most
// 16 KiB) and whether the server closes the connection after it. The
// standard parser builds a header map per answer; a token answer needs three
// of its headers.
func readAnswer(br *bufio.Reader) (status int, body []byte, closing bool, err error) {
	line, err := br.ReadSlice('\n')
	if err != nil {
		return 0, nil, false, err
	}
	// "HTTP/1.1 200 OK\r\n"
	if len(line) < 12 || !bytes.HasPrefix(line, []byte("HTTP/1.")) || line[8] != ' ' {
		return 0, nil, false, fmt.Errorf("malformed status line %q", line)
	}
	if status, err = strconv.Atoi(string(line[9:12])); err != nil {
		return 0, nil, false, fmt.Errorf("malformed status line %q", line)
	}
	length, chunked := -1, false
	for {
		line, err = br.ReadSlice('\n')
		if err != nil {
			return 0, nil, false, err
		}
		line = bytes.TrimRight(line, "\r\n")
		if len(line) == 0 {
			break
		}
		name, value, ok := bytes.Cut(line, []byte(":"))
		if !ok {
			return 0, nil, false, fmt.Errorf("malformed header %q", line)
		}
		value = bytes.TrimSpace(value)
		switch {
		case bytes.EqualFold(name, []byte("Content-Length")):
			if length, err = strconv.Atoi(string(value)); err != nil || length < 0 {
				return 0, nil, false, fmt.Errorf("malformed Content-Length %q", value)
			}
		case bytes.EqualFold(name, []byte("Transfer-Encoding")):
			chunked = bytes.EqualFold(value, []byte("chunked"))
		case bytes.EqualFold(name, []byte("Connection")):
			closing = bytes.EqualFold(value, []byte("close"))
		}
	}
	var r io.Reader
	switch {
	case chunked:
		r = httputil.NewChunkedReader(br)
	case length >= 0:
		r = io.LimitReader(br, int64(length))
	default:
		r, closing = br, true // the body runs to the end of the connection
	}
	body, err = io.ReadAll(io.LimitReader(r, 16<<10))
	if err != nil {
		return 0, nil, false, err
	}
	if len(body) == 16<<10 {
		return status, body, true, nil // the rest of an oversized body is still unread
	}
	if chunked {
		// The chunked reader stops after the last chunk; the trailer (empty
		// for our server) ends at an empty line.
		for {
			line, err := br.ReadSlice('\n')
			if err != nil {
				return 0, nil, false, err
			}
			if len(bytes.TrimRight(line, "\r\n")) == 0 {
				break
			}
		}
	}
	return status, body, closing, nil
}

var accessTokenField = []byte(`"access_token":"`)

// parseTokenAnswer finds access_token (or error) in a token endpoint's JSON.
// Tokens are base64url, never escaped, so a scan finds them; anything else
// goes through encoding/json.
func parseTokenAnswer(data []byte) (token, errCode string) {
	if i := bytes.Index(data, accessTokenField); i >= 0 {
		rest := data[i+len(accessTokenField):]
		if j := bytes.IndexByte(rest, '"'); j > 0 && bytes.IndexByte(rest[:j], '\\') < 0 {
			return string(rest[:j]), ""
		}
	}
	var tr struct {
		AccessToken string `json:"access_token"`
		Error       string `json:"error"`
	}
	_ = json.Unmarshal(data, &tr)
	return tr.AccessToken, tr.Error
}

func errKindOf(err error) string {
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return "timeout"
	}
	return "transport"
}

func isReset(err error) bool {
	var op *net.OpError
	return errors.As(err, &op) && !op.Timeout()
}
