package policy

import (
	"errors"
	"fmt"
	"net/url"
	"strconv"
	"strings"
)

// CanonicalOrigin returns the web origin o as browsers send it in the
// Origin header: http or https and a host, both lowercase, and a port
// only when it is not the scheme's default. It fails for what no browser
// sends: another scheme, a path, a query, user info, a host outside
// ASCII (browsers send its punycode form).
func CanonicalOrigin(o string) (string, error) {
	scheme, rest, ok := strings.Cut(o, "://")
	scheme = strings.ToLower(scheme)
	if !ok || scheme != "http" && scheme != "https" {
		return "", errors.New("want http:// or https:// and a host, such as https://app.example.com")
	}
	if strings.ContainsAny(rest, "/?#@") {
		return "", errors.New("want scheme://host[:port] alone, without a path, query or user")
	}
	u, err := url.Parse(scheme + "://" + rest)
	if err != nil || u.Hostname() == "" {
		return "", errors.New("want scheme://host[:port], such as https://app.example.com")
	}
	host := u.Hostname()
	for i := range len(host) {
		if host[i] >= 0x80 || host[i] == '%' {
			return "", errors.New("write the host as browsers send it: in ASCII (its punycode form), without a zone")
		}
	}
	host = strings.ToLower(host)
	if strings.Contains(host, ":") {
		host = "[" + host + "]"
	}
	if p := u.Port(); p != "" {
		n, err := strconv.Atoi(p)
		if err != nil || n < 1 || n > 65535 {
			return "", fmt.Errorf("port '%s' is not from 1 to 65535", p)
		}
		if !(scheme == "http" && n == 80 || scheme == "https" && n == 443) {
			host += ":" + strconv.Itoa(n)
		}
	} else if strings.HasSuffix(rest, ":") {
		return "", errors.New("want a port after ':'")
	}
	return scheme + "://" + host, nil
}

// CheckOrigin refuses an origin that is not written as browsers send it,
// since it would never match one; the error names the form to write.
// Every configured origin (cors, a key's origins, the dashboard's) is
// checked by it.
func CheckOrigin(o string) error {
	c, err := CanonicalOrigin(o)
	if err != nil {
		return fmt.Errorf("invalid origin '%s': %v", o, err)
	}
	if c != o {
		return fmt.Errorf("origin '%s' never matches what browsers send: write '%s'", o, c)
	}
	return nil
}
