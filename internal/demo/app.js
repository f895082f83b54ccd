// The browser demo of caddy-vigthoria: a chat page on its own origin that
// calls the proxy across origins, streams the answer, and shows the
// caller's limits and the proxy's refusals as they come. It calls with a
// demo client key, or as a signed-in user with a short-lived token that
// the app's backend beside the page mints for the user (POST /api/token
// on the page's origin), renewed before it expires.
// config.js sets window.VIGTHORIA = {apiBase, key, signIn} before this runs.
"use strict";
(function () {
	const cfg = window.VIGTHORIA || {};
	const base = String(cfg.apiBase || "").replace(/\/+$/, "");
	const $ = (id) => document.getElementById(id);
	const num = (v) => (v === null || v === undefined || v === "" ? "–" : Number(v).toLocaleString("en-US"));
	const state = { history: [], busy: false, requestLimit: 0, mode: cfg.key ? "key" : "user" };
	// session is the signed-in user's: {user, tier, token, expiresAt and
	// renewAt in ms, timer, pending renewal, tokens fetched}, or null.
	let session = null;

	// credential returns what the page sends as its bearer: the demo key,
	// or the signed-in user's token, renewed first when it is due.
	async function credential() {
		if (state.mode === "key") {
			return cfg.key;
		}
		if (!session) {
			const e = new Error("Sign in first: type a name and press Sign in.");
			e.kind = "auth";
			throw e;
		}
		if (Date.now() >= session.renewAt) {
			await renew();
		}
		return session.token;
	}

	// call fetches an API path with the page's credential. It throws an
	// Error with kind "network" when the browser got no readable answer
	// (the proxy is down, or refused this page's origin), and kind "http"
	// with the API's error fields for an error status.
	async function call(path, init) {
		init = init || {};
		const headers = Object.assign({ Authorization: "Bearer " + await credential() }, init.headers || {});
		let res;
		try {
			res = await fetch(base + path, Object.assign({}, init, { headers }));
		} catch (err) {
			const e = new Error(
				"Could not reach the API at " + base + " from this page (" + location.origin + "). " +
				"The proxy refuses web origins that its cors setting does not list, or it is not running. " +
				"(" + err + ")");
			e.kind = "network";
			throw e;
		}
		showLimits(res);
		if (!res.ok) {
			throw await httpError(res);
		}
		return res;
	}

	async function httpError(res) {
		const text = await res.text();
		let body = null;
		try {
			body = JSON.parse(text).error || null;
		} catch (_) { /* not the API's shape */ }
		const e = new Error((body && body.message) || text || res.statusText);
		e.kind = "http";
		e.status = res.status;
		e.code = (body && body.code) || "";
		e.retryAfter = res.headers.get("Retry-After");
		e.shouldRetry = res.headers.get("x-should-retry");
		return e;
	}

	// describe says what went wrong as the page's user reads it.
	function describe(e, short) {
		switch (e.kind) {
		case "http": {
			let s = e.status + " " + (e.code || "error");
			if (!short) s += ": " + e.message;
			if (e.retryAfter) s += short ? " · retry in " + e.retryAfter + " s" : " (Retry-After: " + e.retryAfter + " s)";
			if (e.shouldRetry === "false") s += short ? " · do not retry" : " Retrying will not help before the quota resets.";
			return s;
		}
		case "stream":
			return "The stream broke off: " + (e.code ? e.code + ": " : "") + e.message;
		default:
			return e.message;
		}
	}

	function showError(e) {
		const box = $("error");
		box.hidden = false;
		box.dataset.kind = e.kind || "other";
		box.dataset.status = e.status || "";
		box.dataset.code = e.code || "";
		$("error-text").textContent = describe(e, false);
	}

	// showLimits shows the caller's limits from an answer's headers. The
	// proxy sends them with every answer it admitted or refused for a
	// limit, and exposes them to scripts of the origins it allows.
	function showLimits(res) {
		const h = (name) => res.headers.get(name);
		if (h("x-ratelimit-remaining-requests") === null && h("x-ratelimit-remaining-tokens") === null) {
			return; // refusals before admission carry none
		}
		for (const kind of ["requests", "tokens"]) {
			const remaining = h("x-ratelimit-remaining-" + kind);
			const limit = h("x-ratelimit-limit-" + kind);
			$("remaining-" + kind).textContent = num(remaining);
			$("remaining-" + kind).dataset.value = remaining === null ? "" : remaining;
			$("limit-" + kind).textContent = num(limit);
			$("reset-" + kind).textContent = h("x-ratelimit-reset-" + kind) || "–";
			const pct = remaining !== null && Number(limit) > 0 ? Math.max(0, Math.min(100, 100 * remaining / limit)) : 0;
			$("bar-" + kind).style.width = pct + "%";
			$("bar-" + kind).className = pct < 20 ? "low" : "";
		}
		if (h("x-ratelimit-limit-requests") !== null) {
			state.requestLimit = Number(h("x-ratelimit-limit-requests"));
		}
		$("ratelimit").textContent = h("RateLimit") || "–";
	}

	// signIn asks the app's backend for a token for user. The backend
	// holds the minting key; the page only ever sees the token. A renewal
	// names the session it renews, and is dropped if the user signed out
	// meanwhile.
	async function signIn(user, renewing) {
		let res;
		try {
			res = await fetch("/api/token", {
				method: "POST",
				headers: { "Content-Type": "application/json" },
				body: JSON.stringify({ user }),
			});
		} catch (err) {
			const e = new Error("Could not reach the app's backend at " + location.origin + "/api/token (" + err + ").");
			e.kind = "network";
			throw e;
		}
		if (!res.ok) {
			throw await httpError(res);
		}
		const t = await res.json();
		if (renewing && session !== renewing) {
			return;
		}
		const now = Date.now();
		const expiresAt = t.expires_at * 1000;
		// Renew a minute before the token expires, or at three quarters of
		// its life when that is shorter: a call never leaves with a token
		// about to expire, and a slow answer does not outlive it unnoticed.
		const margin = Math.min(60000, (expiresAt - now) / 4);
		const fetched = session ? session.fetched : 0;
		if (session) {
			clearTimeout(session.timer);
		}
		session = { user: t.user, tier: t.tier, token: t.token, expiresAt, renewAt: expiresAt - margin, fetched: fetched + 1, pending: null };
		session.timer = setTimeout(renewOnTimer, Math.max(0, session.renewAt - now));
		showCaller();
	}

	// renew gets a new token for the signed-in user, one request for any
	// number of calls that find the token due.
	function renew() {
		const s = session;
		if (!s.pending) {
			s.pending = signIn(s.user, s).finally(() => { s.pending = null; });
		}
		return s.pending;
	}

	// renewOnTimer renews the token on time even when the page makes no
	// call; while the demo key is used, the next call renews it instead.
	function renewOnTimer() {
		if (session && state.mode === "user") {
			renew().catch(showError);
		}
	}

	async function refreshUsage() {
		if (!haveCredential()) {
			return;
		}
		try {
			const res = await call("/v1/usage");
			const u = await res.json();
			const l = u.limits || {};
			$("usage-client").textContent = u.client_id || "–";
			$("usage-tier").textContent = u.tier || "–";
			$("usage-requests").textContent = l.requests ? num(l.requests.remaining) + " of " + num(l.requests.limit) : "no limit";
			$("usage-requests").dataset.value = l.requests ? l.requests.remaining : "";
			$("usage-tokens").textContent = l.tokens ? num(l.tokens.remaining) + " of " + num(l.tokens.limit) : "no limit";
			$("usage-tokens").dataset.value = l.tokens ? l.tokens.remaining : "";
			$("usage-today").textContent = num(u.today.requests) + " requests · " + num(u.today.total_tokens) + " tokens";
			$("usage-quota").textContent = l.quota ? num(l.quota.remaining) + " of " + num(l.quota.limit) + " a " + l.quota.period : "no quota";
		} catch (e) {
			showError(e);
		}
	}

	// sseData yields the data of each server-sent event of a body as it
	// arrives; the API sends one "data:" line an event.
	async function* sseData(body) {
		const reader = body.getReader();
		const decoder = new TextDecoder();
		let buf = "";
		for (;;) {
			const { value, done } = await reader.read();
			if (done) {
				return;
			}
			buf += decoder.decode(value, { stream: true });
			let nl;
			while ((nl = buf.indexOf("\n")) >= 0) {
				const line = buf.slice(0, nl).replace(/\r$/, "");
				buf = buf.slice(nl + 1);
				if (line.startsWith("data:")) {
					yield line.slice(5).trim();
				}
			}
		}
	}

	function addMessage(role, text, model) {
		$("hint").hidden = true;
		const msg = document.createElement("article");
		msg.className = "msg " + role;
		const who = document.createElement("div");
		who.className = "who";
		who.textContent = role === "user" ? "You" : model;
		const body = document.createElement("div");
		body.className = "text";
		body.textContent = text;
		const meta = document.createElement("div");
		meta.className = "meta";
		msg.append(who, body, meta);
		$("messages").append(msg);
		msg.scrollIntoView({ block: "end" });
		return msg;
	}

	async function chat(prompt, model) {
		if (state.busy || !prompt.trim()) {
			return;
		}
		setBusy(true);
		const messages = state.history.concat([{ role: "user", content: prompt }]);
		addMessage("user", prompt);
		const msg = addMessage("assistant", "", model);
		const text = msg.querySelector(".text");
		msg.classList.add("streaming");
		let answer = "";
		try {
			const res = await call("/v1/chat/completions", {
				method: "POST",
				headers: { "Content-Type": "application/json" },
				body: JSON.stringify(Object.assign(
					{ model, stream: true, stream_options: { include_usage: true }, messages },
					cfg.maxTokens ? { max_tokens: cfg.maxTokens } : {})),
			});
			let usage = null, chunks = 0;
			for await (const data of sseData(res.body)) {
				if (data === "[DONE]") {
					break;
				}
				const ev = JSON.parse(data);
				if (ev.error) {
					const e = new Error(ev.error.message || "error");
					e.kind = "stream";
					e.code = ev.error.code || "";
					throw e;
				}
				const delta = ev.choices && ev.choices[0] && ev.choices[0].delta && ev.choices[0].delta.content;
				if (delta) {
					answer += delta;
					chunks++;
					text.textContent = answer;
					msg.scrollIntoView({ block: "end" });
				}
				if (ev.usage) {
					usage = ev.usage;
				}
			}
			state.history = messages.concat([{ role: "assistant", content: answer }]);
			msg.querySelector(".meta").textContent = chunks + " chunks" +
				(usage ? " · " + usage.prompt_tokens + " prompt + " + usage.completion_tokens + " completion tokens" : "");
			msg.classList.add("done");
		} catch (e) {
			msg.classList.add("failed");
			msg.querySelector(".meta").textContent = describe(e, false);
			if (!answer) {
				text.textContent = "The proxy refused this request.";
				if (e.kind === "network") {
					text.textContent = "No answer could be read.";
				}
			}
			showError(e);
		} finally {
			msg.classList.remove("streaming");
			await refreshUsage();
			setBusy(false);
		}
	}

	// burst sends small requests one after another until the proxy
	// refuses one, showing how the tier's request bucket empties.
	async function burst() {
		if (state.busy) {
			return;
		}
		setBusy(true);
		const log = $("burst-log");
		log.textContent = "";
		const n = (state.requestLimit || 10) + 2;
		for (let i = 1; i <= n; i++) {
			const li = document.createElement("li");
			try {
				const res = await call("/v1/chat/completions", {
					method: "POST",
					headers: { "Content-Type": "application/json" },
					body: JSON.stringify({ model: $("model").options[0].value, max_tokens: 1, messages: [{ role: "user", content: "ping" }] }),
				});
				await res.json();
				li.className = "ok";
				li.textContent = res.status + " OK · " + num(res.headers.get("x-ratelimit-remaining-requests")) + " requests left";
				log.append(li);
			} catch (e) {
				li.className = "refused";
				li.textContent = describe(e, true);
				log.append(li);
				showError(e);
				break;
			}
		}
		await refreshUsage();
		setBusy(false);
	}

	function haveCredential() {
		return state.mode === "key" ? Boolean(cfg.key) : session !== null;
	}

	function setBusy(busy) {
		state.busy = busy;
		document.body.dataset.state = busy ? "busy" : "idle";
		for (const id of ["send", "try-model", "burst"]) {
			$(id).disabled = busy || !haveCredential();
		}
		$("sign-in-button").disabled = busy;
		$("mode-key").disabled = busy || !cfg.key;
		$("mode-user").disabled = busy;
	}

	// showCaller shows who the page calls as: the mode, the key's hint or
	// the signed-in user and the token's expiry.
	function showCaller() {
		const user = state.mode === "user";
		document.body.dataset.mode = state.mode;
		$("mode-key").setAttribute("aria-pressed", String(!user));
		$("mode-user").setAttribute("aria-pressed", String(user));
		$("sign-in").hidden = !user || session !== null;
		$("session").hidden = !user || session === null;
		$("cred-label").textContent = user ? "token" : "key";
		if (user) {
			$("key-hint").textContent = session ? "of " + session.user : "none: sign in";
		} else {
			$("key-hint").textContent = cfg.key ? cfg.key.slice(0, 8) + "…" + cfg.key.slice(-4) : "none";
		}
		$("mode-note").textContent = user
			? "The app's backend holds a key that may mint tokens; it signs you in by name and gets a short-lived token for you. The page calls with the token, never with a key."
			: "The page calls with the demo client key from config.js: whoever opens the page can read it.";
		if (session) {
			$("session-user").textContent = session.user;
			$("session-tier").textContent = session.tier;
			$("session-expires").textContent = new Date(session.expiresAt).toLocaleTimeString("en-GB");
			$("session").dataset.expires = String(session.expiresAt / 1000);
			$("session").dataset.tokens = String(session.fetched);
		}
		setBusy(state.busy);
	}

	// changeCaller runs f, which changes who the page calls as, and shows
	// the new caller's figures, none of the last one's.
	async function changeCaller(f) {
		if (state.busy) {
			return;
		}
		setBusy(true);
		$("error").hidden = true;
		for (const id of ["remaining-requests", "limit-requests", "reset-requests", "remaining-tokens", "limit-tokens", "reset-tokens",
			"ratelimit", "usage-client", "usage-tier", "usage-requests", "usage-tokens", "usage-today", "usage-quota"]) {
			$(id).textContent = "–";
			delete $(id).dataset.value;
		}
		$("bar-requests").style.width = $("bar-tokens").style.width = "0";
		state.history = [];
		try {
			await f();
			showCaller();
			await refreshUsage();
		} catch (e) {
			showError(e);
		} finally {
			setBusy(false);
		}
	}

	function signOut() {
		clearTimeout(session.timer);
		session = null;
	}

	function init() {
		$("api-base").textContent = base || "not configured";
		$("page-origin").textContent = location.origin;
		$("who").hidden = !cfg.signIn;
		for (const button of [$("mode-key"), $("mode-user")]) {
			button.addEventListener("click", () => changeCaller(() => { state.mode = button.dataset.mode; }));
		}
		$("sign-in").addEventListener("submit", (ev) => {
			ev.preventDefault();
			changeCaller(() => signIn($("user-name").value.trim()));
		});
		$("sign-out").addEventListener("click", () => changeCaller(signOut));
		showCaller();
		$("composer").addEventListener("submit", (ev) => {
			ev.preventDefault();
			const prompt = $("prompt").value;
			$("prompt").value = "";
			chat(prompt, $("model").value);
		});
		$("prompt").addEventListener("keydown", (ev) => {
			if (ev.key === "Enter" && !ev.shiftKey) {
				ev.preventDefault();
				$("composer").requestSubmit();
			}
		});
		$("try-model").addEventListener("click", () => chat("Which model are you?", "vigthoria-pro-1"));
		$("burst").addEventListener("click", burst);
		$("refresh-usage").addEventListener("click", refreshUsage);
		if (!base || !(cfg.key || cfg.signIn)) {
			showError({ kind: "config", message: "config.js did not set window.VIGTHORIA = {apiBase, key or signIn}." });
			setBusy(false);
			return;
		}
		setBusy(true);
		refreshUsage().finally(() => setBusy(false));
	}

	init();
})();
