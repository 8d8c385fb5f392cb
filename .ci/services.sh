#!/usr/bin/env bash
# Start PostgreSQL, RabbitMQ and Redis on localhost when they do not answer, then wait for them.
set -uo pipefail

answers() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

wait_for() {
  local name=$1 port=$2
  for _ in $(seq 1 60); do
    answers "$port" && return 0
    sleep 1
  done
  echo "services: $name did not answer on 127.0.0.1:$port" >&2
  return 1
}

if ! answers 5432; then
  echo "services: starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
fi
if ! answers 5672; then
  echo "services: starting RabbitMQ"
  rabbitmq-server -detached
fi
if ! answers 6379; then
  echo "services: starting Redis"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
fi
wait_for PostgreSQL 5432 && wait_for RabbitMQ 5672 && wait_for Redis 6379 || exit 1

# The application database (tests make their own test_ database beside it).
if ! psql -h 127.0.0.1 -U postgres -tAc "select 1 from pg_database where datname='wsgateway'" 2>/dev/null | grep -q 1; then
  psql -h 127.0.0.1 -U postgres -qc "create database wsgateway" >/dev/null 2>&1 || echo "services: could not create database wsgateway"
fi

# The management plugin serves queue statistics to the monitors; enabling it twice is harmless.
if command -v rabbitmq-plugins >/dev/null 2>&1 && ! answers 15672; then
  rabbitmq-plugins enable --quiet rabbitmq_management >/dev/null 2>&1 || echo "services: could not enable rabbitmq_management (monitors fall back to passive declares)"
  wait_for "RabbitMQ management" 15672 || true
fi
# The AMQP port opens before RabbitMQ accepts logins; wait until it does.
for _ in $(seq 1 60); do
  rabbitmqctl -q await_startup >/dev/null 2>&1 && break
  sleep 1
done
exit 0
