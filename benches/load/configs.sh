# The nginx and HAProxy configurations the benchmarks compare Switchyard with, sourced by
# run.sh, callgrind.sh and cpu_split.sh so all measure the same proxies. Production
# settings: keep-alive to the origin, one worker, access logs off.
#
# The functions print the configuration; they read these variables:
#   P_ORIGIN            the origin's port
#   P_NGINX P_NGINX_H2  nginx's HTTP/1.1 and h2c (prior knowledge) ports
#   P_HAPROXY           HAProxy's port (HTTP/1.1 and h2c)
#   FD_LIMIT            the open-file limit, which sizes the connection limits

# nginx_conf DIR MASTER: DIR holds the pid file, error log and temp files; MASTER is `on`,
# or `off` for a single process (so a profiler sees the worker's work).
nginx_conf() {
    local dir=$1 master=$2
    cat <<EOF
worker_processes 1;
master_process $master;
worker_rlimit_nofile $FD_LIMIT;
daemon off;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections $((FD_LIMIT - 100)); multi_accept on; }
http {
    access_log off;
    client_body_temp_path $dir/tmp;
    proxy_temp_path $dir/tmp;
    fastcgi_temp_path $dir/tmp;
    uwsgi_temp_path $dir/tmp;
    scgi_temp_path $dir/tmp;
    keepalive_requests 100000;
    upstream origin {
        server 127.0.0.1:$P_ORIGIN;
        keepalive 64;
    }
    map \$http_upgrade \$connection_upgrade { default upgrade; '' ''; }
    server {
        listen 127.0.0.1:$P_NGINX;
        location / {
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection \$connection_upgrade;
            proxy_set_header Upgrade \$http_upgrade;
            proxy_set_header Host \$host;
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            proxy_read_timeout 1h;
        }
    }
    server {
        listen 127.0.0.1:$P_NGINX_H2 http2;
        location / {
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$host;
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
        }
    }
}
EOF
}

haproxy_conf() {
    cat <<EOF
global
    nbthread 1
    # Each connection costs two descriptors (client and server side).
    maxconn $((FD_LIMIT / 2 - 100))
    tune.bufsize 16384

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
    timeout tunnel 1h

frontend fe
    # A clear-text HTTP frontend also takes HTTP/2 with prior knowledge (h2c).
    bind 127.0.0.1:$P_HAPROXY
    option forwardfor
    default_backend origin

backend origin
    server o1 127.0.0.1:$P_ORIGIN maxconn 1024
EOF
}
