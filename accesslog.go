package vigthoria

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/vigthoria/caddy-vigthoria/api"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// Every request reaches the access log. Caddy writes a request's line
// from a copy of it taken before any handler runs, and redacts only
// Authorization, Proxy-Authorization and Cookie in it: a client key or a
// token a caller put in another header or in the URL would be printed
// as it came. For such a request Caddy's line is skipped and this
// handler writes the same line itself — same loggers, message, level and
// fields, status, size and duration, the caller and the vigthoria_*
// fields — from a copy with those credentials redacted. Fields other
// handlers add to the line (log_append, tracing) are not in it.

// accessLine is the access log line of a request that carries a
// credential where Caddy's line would print it; it collects the fields
// the request adds to its line (logFields).
type accessLine struct {
	loggers []*zap.Logger
	request caddyhttp.LoggableHTTPRequest // the redacted copy
	rec     caddyhttp.ResponseRecorder
	body    *countingBody
	start   time.Time
	fields  []zapcore.Field
}

type accessLineKey struct{}

// Add adds a field to the line.
func (l *accessLine) Add(f zap.Field) { l.fields = append(l.fields, f) }

// logAdder is where a request's access log fields go: Caddy's extra
// fields of its line, or the accessLine that replaces it.
type logAdder interface{ Add(zap.Field) }

// redactedLine returns the line that replaces Caddy's for r, and the
// writer and request to serve it with, when r carries a credential where
// Caddy's access log would print it; else nil. It costs nothing more
// than the check for requests without one.
func (h *Handler) redactedLine(w http.ResponseWriter, r *http.Request) (*accessLine, http.ResponseWriter, *http.Request) {
	srv, ok := r.Context().Value(caddyhttp.ServerCtxKey).(*caddyhttp.Server)
	if !ok || srv.Logs == nil || h.accessLog == nil {
		return nil, w, r
	}
	if skip, _ := caddyhttp.GetVar(r.Context(), caddyhttp.LogSkipVar).(bool); skip {
		return nil, w, r // another handler left it out (log_skip)
	}
	uri := r.RequestURI
	if orig, ok := r.Context().Value(caddyhttp.OriginalRequestCtxKey).(http.Request); ok {
		uri = orig.RequestURI // what Caddy's line shows
	}
	keepCredentials := srv.Logs.ShouldLogCredentials
	hostShaped := credentialShaped(r.Host) // a site that answers any name
	if !headersCarryCredential(r.Header, keepCredentials) && !uriCarriesCredential(uri) && !hostShaped {
		return nil, w, r
	}
	loggers := accessLoggers(h.accessLog, srv.Logs, r)
	caddyhttp.SetVar(r.Context(), caddyhttp.LogSkipVar, true)
	if len(loggers) == 0 {
		return nil, w, r // the server keeps no line for this host
	}
	shown := r.WithContext(r.Context())
	shown.RequestURI = redactURI(uri)
	shown.Header = redactHeaders(r.Header, keepCredentials)
	if hostShaped {
		shown.Host = "REDACTED"
	}
	l := &accessLine{
		loggers: loggers,
		request: caddyhttp.LoggableHTTPRequest{Request: shown, ShouldLogCredentials: keepCredentials},
		rec:     caddyhttp.NewResponseRecorder(w, nil, nil),
		start:   time.Now(),
	}
	r = r.WithContext(context.WithValue(r.Context(), accessLineKey{}, l))
	if r.Body != nil {
		l.body = &countingBody{ReadCloser: r.Body}
		r.Body = l.body
	}
	return l, l.rec, r
}

// write writes the line once the request was served. err, what the
// handler returned, is answered and logged here rather than returned:
// Caddy's error log would print the request as it came, credential
// included.
func (l *accessLine) write(r *http.Request, err error, logger *zap.Logger) {
	status := l.rec.Status()
	if err != nil {
		if status == 0 {
			status = http.StatusInternalServerError
			var he caddyhttp.HandlerError
			if errors.As(err, &he) && he.StatusCode != 0 {
				status = he.StatusCode
			}
			l.rec.WriteHeader(status)
		}
		logger.Error("serving a request that carries a credential outside Authorization", zap.Int("status", status), zap.Error(err))
	}
	level := zapcore.InfoLevel
	if status >= 500 {
		level = zapcore.ErrorLevel
	}
	if name, ok := caddyhttp.GetVar(r.Context(), caddyhttp.LogLevelVar).(string); ok {
		if lv, err := zapcore.ParseLevel(name); err == nil && lv >= zapcore.DebugLevel && lv <= zapcore.ErrorLevel {
			level = lv
		}
	}
	var read int
	if l.body != nil {
		read = l.body.n
	}
	var userID string
	if repl, ok := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer); ok {
		userID, _ = repl.GetString("http.auth.user.id")
	}
	fields := append([]zapcore.Field{
		zap.Object("request", l.request),
		zap.Int("bytes_read", read),
		zap.String("user_id", userID),
		zap.Duration("duration", time.Since(l.start)),
		zap.Int("size", l.rec.Size()),
		zap.Int("status", status),
		zap.Object("resp_headers", caddyhttp.LoggableHTTPHeader{Header: l.rec.Header(), ShouldLogCredentials: l.request.ShouldLogCredentials}),
	}, l.fields...)
	for _, logger := range l.loggers {
		if c := logger.Check(level, "handled request"); c != nil {
			c.Write(fields...)
		}
	}
}

// countingBody counts the bytes read from a request's body.
type countingBody struct {
	io.ReadCloser
	n int
}

func (b *countingBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	b.n += n
	return n, err
}

// httpApp names Caddy's http app when asking for the logger it writes
// access logs with: ctx.Logger gives a module the logs configured for its
// ID, and the access logs are configured for the http app's.
type httpApp struct{}

func (httpApp) CaddyModule() caddy.ModuleInfo { return caddy.ModuleInfo{ID: "http"} }

// accessLogger is the logger Caddy's servers write access logs with.
func accessLogger(ctx caddy.Context) *zap.Logger {
	return ctx.Logger(httpApp{}).Named("log.access")
}

// accessLoggers are the loggers Caddy writes r's access log line to:
// the names set for the request (log_name), else those of its host
// (logger_names), else the default; none for a host left out.
func accessLoggers(base *zap.Logger, logs *caddyhttp.ServerLogConfig, r *http.Request) []*zap.Logger {
	var names []string
	if set, ok := caddyhttp.GetVar(r.Context(), caddyhttp.AccessLoggerNameVarKey).([]any); ok {
		for _, n := range set {
			if s, ok := n.(string); ok {
				names = append(names, s)
			}
		}
	} else {
		host, _, err := net.SplitHostPort(r.Host)
		if err != nil {
			host = r.Host
		}
		host = strings.ToLower(host)
		mapped, ok := matchHost(host, func(h string) ([]string, bool) {
			n, ok := logs.LoggerNames[h]
			return n, ok
		})
		switch {
		case ok:
			names = mapped
		case logs.SkipUnmappedHosts:
			return nil
		default:
			if _, skip := matchHost(host, func(h string) ([]string, bool) {
				for _, s := range logs.SkipHosts {
					if strings.EqualFold(s, h) {
						return nil, true
					}
				}
				return nil, false
			}); skip {
				return nil
			}
			names = []string{logs.DefaultLoggerName}
		}
	}
	loggers := make([]*zap.Logger, 0, len(names))
	for _, n := range names {
		if n == "" {
			loggers = append(loggers, base)
		} else {
			loggers = append(loggers, base.Named(n))
		}
	}
	return loggers
}

// matchHost looks host up as Caddy matches hosts of its log config: as
// it is, then with its labels from the left replaced by '*' one by one.
func matchHost(host string, lookup func(string) ([]string, bool)) ([]string, bool) {
	if v, ok := lookup(host); ok {
		return v, true
	}
	labels := strings.Split(host, ".")
	for i := range labels {
		if labels[i] == "" {
			continue
		}
		labels[i] = "*"
		if v, ok := lookup(strings.Join(labels, ".")); ok {
			return v, true
		}
	}
	return nil, false
}

// headersCarryCredential reports whether a header Caddy's access log
// prints holds a credential: one named as a credential (X-Api-Key,
// X-Auth-Token, …) or a value shaped as a client key or a JWT. The
// headers Caddy redacts count only when the server logs credentials.
func headersCarryCredential(h http.Header, logCredentials bool) bool {
	for name, values := range h {
		if caddyRedacts(name) && !logCredentials {
			continue
		}
		for _, v := range values {
			if v != "" && namesCredential(name) && !caddyRedacts(name) || credentialShaped(v) {
				return true
			}
		}
	}
	return false
}

// redactHeaders is h as the access log may show it: the values of
// headers named as credentials replaced whole, client keys and JWTs cut
// out of every other.
func redactHeaders(h http.Header, logCredentials bool) http.Header {
	out := make(http.Header, len(h))
	for name, values := range h {
		if caddyRedacts(name) && !logCredentials {
			out[name] = values // Caddy prints them as REDACTED
			continue
		}
		shown := make([]string, len(values))
		for i, v := range values {
			switch {
			case namesCredential(name) && !caddyRedacts(name):
				shown[i] = "REDACTED"
			default:
				shown[i] = api.RedactCredentials(v)
			}
		}
		out[name] = shown
	}
	return out
}

// caddyRedacts reports whether Caddy's access log redacts the header
// unless the server logs credentials.
func caddyRedacts(name string) bool {
	switch name {
	case "Authorization", "Proxy-Authorization", "Cookie", "Set-Cookie":
		return true
	}
	return false
}

// namesCredential reports whether a header's name says it carries a
// credential: Api-Key, X-Api-Key, X-Goog-Api-Key, X-Auth-Token,
// X-Amz-Security-Token, X-Session-Id, … It runs on every header of every
// request, so it looks at each byte once and allocates nothing.
func namesCredential(name string) bool {
	for i := range len(name) {
		var words []string
		switch name[i] | 0x20 { // ASCII lower case
		case 'a':
			words = credentialWordsA
		case 'c':
			words = credentialWordsC
		case 'p':
			words = credentialWordsP
		case 's':
			words = credentialWordsS
		case 't':
			words = credentialWordsT
		default:
			continue
		}
		for _, w := range words {
			if len(name)-i >= len(w) && strings.EqualFold(name[i:i+len(w)], w) {
				return true
			}
		}
	}
	return false
}

// The words of credential headers' names, by their first letter.
var (
	credentialWordsA = []string{"auth", "api-key", "apikey", "access-key"}
	credentialWordsC = []string{"cookie", "credential"}
	credentialWordsP = []string{"password"}
	credentialWordsS = []string{"secret", "session"}
	credentialWordsT = []string{"token"}
)

// credentialShaped reports whether s holds a client key (vgt_ and its
// characters) or a JWT (a base64url JSON header, eyJ…, then a dot),
// however short: a key with one character wrong is still nearly a key.
func credentialShaped(s string) bool {
	for i := 0; ; {
		j := strings.Index(s[i:], "vgt_")
		if j < 0 {
			break
		}
		i += j + len("vgt_")
		if i < len(s) && isAlnum(s[i]) {
			return true
		}
	}
	for i := 0; ; {
		j := strings.Index(s[i:], "eyJ")
		if j < 0 {
			return false
		}
		i += j + len("eyJ")
		end := i
		for end < len(s) && (isAlnum(s[end]) || s[end] == '-' || s[end] == '_') {
			end++
		}
		if end < len(s) && s[end] == '.' {
			return true
		}
	}
}

func isAlnum(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z'
}

// uriCarriesCredential reports whether a request URI holds a client key
// or a JWT, percent-encoded or not, or a query parameter named like a
// credential.
func uriCarriesCredential(uri string) bool {
	if credentialShaped(uri) {
		return true
	}
	path, query, _ := strings.Cut(uri, "?")
	if credentialShaped(api.PercentDecoded(path)) {
		return true
	}
	return keyInQuery(query)
}

// redactURI is uri as the access log may show it: client keys and JWTs
// cut out of the path, and a query that carries a credential replaced
// whole.
func redactURI(uri string) string {
	path, query, hasQuery := strings.Cut(uri, "?")
	path = api.RedactCredentials(path)
	if credentialShaped(api.PercentDecoded(path)) {
		path = "/REDACTED" // percent-encoded
	}
	if !hasQuery {
		return path
	}
	if keyInQuery(query) || credentialShaped(query) {
		query = "REDACTED"
	}
	return path + "?" + query
}
