# ws-gateway: one image for every Procfile process (web, gateway, worker, beat, flower).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    WS_GATEWAY_PORT=4400

RUN groupadd --system app && useradd --system --gid app --home-dir /app --shell /usr/sbin/nologin app
WORKDIR /app

COPY requirements/base.txt requirements/base.txt
RUN pip install -r requirements/base.txt

COPY --chown=app:app . .
# collectstatic needs settings to import; the build-time key is never used at run time.
RUN DJANGO_SECRET_KEY=build-only python manage.py collectstatic --noinput

USER app
EXPOSE 4400
CMD ["sh", "-c", "gunicorn wsgateway.wsgi --bind 0.0.0.0:${WS_GATEWAY_PORT} --workers ${WEB_CONCURRENCY:-2} --access-logfile -"]
