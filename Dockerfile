# Silent-monitoring gateway. Build: docker build -t sm-gateway .
# Run:  docker run -p 8080:8080 -p 5060:5060/udp -p 20000-20999:20000-20999/udp \
#         -e GATEWAY_KEYCLOAK_URL=https://keycloak.example -e GATEWAY_PUBLIC_URL=https://gw.example \
#         -e GATEWAY_ADMIN_CLIENT_ID=gateway-directory -e GATEWAY_ADMIN_CLIENT_SECRET=... sm-gateway
# (a realm to import: deploy/realm-cx.json). The image holds no identity provider, no demo realm and
# no secret: without those settings it refuses to start and says what to set.
# pjsua2's wheel exists for CPython 3.11/3.12 only.
FROM python:3.12-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    GATEWAY_HOST=0.0.0.0 GATEWAY_SIP_HOST=0.0.0.0 GATEWAY_DATA_DIR=/var/lib/gateway

RUN useradd --system --create-home --home-dir /home/gateway --uid 10001 gateway \
 && mkdir -p /var/lib/gateway && chown gateway:gateway /var/lib/gateway

WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip install .

USER gateway
EXPOSE 8080/tcp 5060/udp
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)" || exit 1
ENTRYPOINT ["python", "-m", "gateway"]
CMD ["serve"]
