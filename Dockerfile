# Silent-monitoring gateway. Build: docker build -t sm-gateway .
# Run:  docker run -p 8080:8080 -p 5060:5060/udp -p 20000-28255:20000-28255/udp -e GATEWAY_SIP_WORKERS=4 \
#         -e GATEWAY_KEYCLOAK_URL=https://keycloak.example -e GATEWAY_PUBLIC_URL=https://gw.example \
#         -e GATEWAY_ADMIN_CLIENT_ID=gateway-directory -e GATEWAY_ADMIN_CLIENT_SECRET=... sm-gateway
# (RTP: 2064 ports per SIP worker from GATEWAY_RTP_PORT_BASE, one worker per core by default:
# publish 2064 x workers; a realm to import: deploy/realm-cx.json). The image holds no identity
# provider, no demo realm and no secret: without those settings it refuses to start and says
# what to set.

# Builder: pjsua2 for this image's Python, built for hundreds of calls per worker from the
# pjproject in Debian sid's asterisk source package, by the same script as scripts/setup.sh
# (which installs the rest of its build dependencies; libopus-dev, for Opus legs, is listed
# here too so the layer is cached with the compiler's libraries).
FROM python:3.12-slim-bookworm AS pjsua2
RUN apt-get update \
 && apt-get install -y --no-install-recommends libopus-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY scripts/build-pjsua2.sh scripts/
COPY scripts/pjsua2 scripts/pjsua2
RUN GATEWAY_PJSUA2_CACHE=/pjsua2 scripts/build-pjsua2.sh python3 \
 && mkdir /wheels && cp /pjsua2/*/pjsua2_python-*.whl /wheels/

FROM python:3.12-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    GATEWAY_HOST=0.0.0.0 GATEWAY_SIP_HOST=0.0.0.0 GATEWAY_DATA_DIR=/var/lib/gateway

RUN useradd --system --create-home --home-dir /home/gateway --uid 10001 gateway \
 && mkdir -p /var/lib/gateway && chown gateway:gateway /var/lib/gateway

# The self-built pjsua2's shared libraries (OpenSSL 3 and libuuid are in the base image;
# libopus0: Opus legs and phones).
RUN apt-get update \
 && apt-get install -y --no-install-recommends libspeexdsp1 libsrtp2-1 libopus0 \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY --from=pjsua2 /wheels /wheels
# The local wheel satisfies the pjsua2-python requirement, so PyPI's 4-call wheel is not installed.
RUN pip install /wheels/pjsua2_python-*.whl . && rm -rf /wheels
# Fail the image build if pjsua2 can't hold 64 calls (128 call slots) in one process.
COPY scripts/check-pjsua2.py /tmp/
RUN python /tmp/check-pjsua2.py && rm /tmp/check-pjsua2.py

USER gateway
# SIP on UDP and TCP; 5061: SIP over TLS when GATEWAY_SIP_TLS_PORT=5061 (off by default).
EXPOSE 8080/tcp 5060/udp 5060/tcp 5061/tcp
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)" || exit 1
ENTRYPOINT ["python", "-m", "gateway"]
CMD ["serve"]
