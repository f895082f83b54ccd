# syntax=docker/dockerfile:1
# Caddy with the vigthoria module, built from this source tree in the
# convention of Caddy's own images: xcaddy in caddy:builder, the binary
# copied into caddy. See docs/deploy.md.
#
#   docker build -t caddy-vigthoria .
#   docker run -d -p 80:80 -p 443:443 -e VIGTHORIA_API_KEY \
#       -v caddy_data:/data -v caddy_config:/config caddy-vigthoria
#
# CADDY_VERSION is xcaddy.json's caddy_version without its "v" (a test
# checks that they agree).
ARG CADDY_VERSION=2.11.9

FROM caddy:${CADDY_VERSION}-builder AS builder
ARG CADDY_VERSION
WORKDIR /src
# The module's dependencies in a layer of their own, so that a change of
# source does not download them again.
COPY go.mod go.sum ./
RUN go mod download
COPY . .
# The module comes from this directory. The zero version keeps "go get"
# from asking the module proxy for a version of it (it may not be
# published yet); to build a published tag instead, see docs/deploy.md.
RUN xcaddy build v${CADDY_VERSION} \
	--with github.com/vigthoria/caddy-vigthoria@v0.0.0-00010101000000-000000000000=. \
	--output /usr/bin/caddy

FROM caddy:${CADDY_VERSION}
COPY --from=builder /usr/bin/caddy /usr/bin/caddy
COPY deploy/Caddyfile /etc/caddy/Caddyfile
# Not root: the binary may bind ports below 1024, and the caddy user owns
# Caddy's data directory (/data, XDG_DATA_HOME in this image), where the
# default key store is /data/caddy/vigthoria/vigthoria.db, and its config
# directory (/config). A named volume mounted there takes this ownership.
# caddy declares both as volumes: BuildKit (Docker's builder since Engine
# 23) keeps the chown; the legacy builder would drop it.
RUN setcap cap_net_bind_service=+ep /usr/bin/caddy \
	&& addgroup -S -g 1000 caddy \
	&& adduser -S -D -H -u 1000 -G caddy -h /data -s /sbin/nologin caddy \
	&& chown -R caddy:caddy /data /config
USER caddy
