# The production image: a wheel of this checkout (its migrations and policies
# inside) installed into the distribution's Python image, served by gunicorn
# with gunicorn.conf.py as a user that is not root.
#
#   docker build -t chat-blueprint .
#   docker run --rm -e DATABASE_URL=<owner url> -e APP_DB_ROLE=chat_app chat-blueprint flask --app wsgi db upgrade
#   docker run -p 8000:8000 -e DATABASE_URL=<app url> -e BETTER_AUTH_SECRET=... chat-blueprint
#
# tests/test_install.py lints this file with hadolint and runs its steps
# without a container engine (docs/operations.md, "An instance").

FROM python:3.11-slim AS wheel
WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY chat_blueprint ./chat_blueprint
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=wheel /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl \
    && rm -rf /wheels \
    && groupadd --system --gid 10001 chat \
    && useradd --system --uid 10001 --gid chat --no-create-home --home-dir /app --shell /usr/sbin/nologin chat
WORKDIR /app
COPY wsgi.py gunicorn.conf.py ./
# Numeric, so an orchestrator can tell it is not root (Kubernetes' runAsNonRoot).
USER 10001:10001
EXPOSE 8000
# Liveness, not readiness: Docker and Swarm replace an unhealthy container, and
# a database outage would fail /readyz on every one of them at once, where a
# restart cures nothing. The load balancer asks /readyz.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8000'), timeout=4)"]
CMD ["gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
