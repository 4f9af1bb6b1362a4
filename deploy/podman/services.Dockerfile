# syntax=docker/dockerfile:1
# Stand-ins for the registry images compose names (nginx:1.27-alpine, prom/prometheus, prom/alertmanager)
# where no registry is reachable: Debian's packages on a local Debian base (deploy/podman/images.sh),
# each with what compose expects of its image: the same entrypoint behaviour, the same paths, wget for
# the health checks, the same user. deploy/podman/compose.debian-images.yaml maps the services to them.
ARG BASE_IMAGE=localhost/servable-base:bookworm

FROM ${BASE_IMAGE} AS debian
SHELL ["/bin/sh", "-euxc"]
# hadolint ignore=DL3008
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends wget \
 && rm -rf /var/lib/apt/lists/*

# nginx: the official image's entrypoint fills /etc/nginx/templates/*.template into /etc/nginx/conf.d/
# with envsubst (only variables that are set) before starting nginx in the foreground; logs go to the
# container's output.
FROM debian AS nginx
# hadolint ignore=DL3008
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx gettext-base \
 && rm -rf /var/lib/apt/lists/* /etc/nginx/sites-enabled/* /etc/nginx/conf.d/* \
 && ln -sf /dev/stdout /var/log/nginx/access.log && ln -sf /dev/stderr /var/log/nginx/error.log
COPY nginx-entrypoint.sh /usr/local/bin/nginx-entrypoint
EXPOSE 8080 8443
STOPSIGNAL SIGQUIT
ENTRYPOINT ["/usr/local/bin/nginx-entrypoint"]
CMD ["nginx", "-g", "daemon off;"]

# Prometheus: the official image's entrypoint, working directory and user (nobody).
FROM debian AS prometheus
# hadolint ignore=DL3008
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /prometheus && chown nobody:nogroup /prometheus
USER 65534:65534
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]

# Alertmanager: the same, as the official image runs it.
FROM debian AS alertmanager
# hadolint ignore=DL3008
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus-alertmanager \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /alertmanager && chown nobody:nogroup /alertmanager
USER 65534:65534
WORKDIR /alertmanager
EXPOSE 9093
ENTRYPOINT ["/usr/bin/prometheus-alertmanager"]
CMD ["--config.file=/etc/alertmanager/alertmanager.yml", "--storage.path=/alertmanager"]
