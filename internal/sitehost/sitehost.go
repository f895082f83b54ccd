// Package sitehost tells whether a handler is served only under the host
// names its site was given: Caddy then checks each request's Host against
// them, and a page of another name that DNS points at the server (DNS
// rebinding) never reaches the handler.
//
// It imports Caddy's HTTP app only.
package sitehost

import "github.com/caddyserver/caddy/v2/modules/caddyhttp"

// Guarded reports whether target is among routes (and their subroutes),
// and whether every way to it passes a host matcher: a site with names,
// or a handle with a host matcher.
func Guarded(routes caddyhttp.RouteList, target caddyhttp.MiddlewareHandler) (found, guarded bool) {
	return find(routes, target, false)
}

// find looks for target in routes and their subroutes, and reports
// whether it was found and whether a host matcher guards the way to it
// (vetted: one already did).
func find(routes caddyhttp.RouteList, target caddyhttp.MiddlewareHandler, vetted bool) (found, guarded bool) {
	for _, route := range routes {
		v := vetted || matchesHosts(route.MatcherSets)
		for _, handler := range route.Handlers {
			if handler == target {
				return true, v
			}
			if sub, ok := handler.(*caddyhttp.Subroute); ok {
				if found, guarded := find(sub.Routes, target, v); found {
					return true, guarded
				}
			}
		}
	}
	return false, false
}

// matchesHosts reports whether every one of sets (any of which may let
// a request through) holds a host matcher.
func matchesHosts(sets caddyhttp.MatcherSets) bool {
	for _, set := range sets {
		has := false
		for _, m := range set {
			if hosts, ok := m.(*caddyhttp.MatchHost); ok && len(*hosts) > 0 {
				has = true
			}
		}
		if !has {
			return false
		}
	}
	return len(sets) > 0
}
