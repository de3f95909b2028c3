# Memory per WebSocket handshake under way: N upgrade requests sent through `switchyard run`
# (one worker, core 0) to an upstream that reads each request and never answers, RSS
# read once all N wait on it, with jemalloc returning freed pages at once so that RSS is
# what is in use. What a burst of reconnects holds while the upstream is slow to answer.
#
#   python3 benches/load/handshakes_waiting.py path/to/switchyard [N, default 2000]
#
# Loopback only; the proxy is stopped by PID at the end, the upstream with this process.
import asyncio, os, shutil, socket, subprocess, sys, tempfile
binary = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
def rss(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1])
code = 0
async def main():
    global code
    accepted = 0
    held = []
    async def on_conn(r, w):
        nonlocal accepted
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await r.read(4096)
            if not chunk:
                return
            data += chunk
        accepted += 1
        held.append(w)
        await asyncio.sleep(3600)
    server = await asyncio.start_server(on_conn, "127.0.0.1", 0, backlog=4096)
    up = server.sockets[0].getsockname()[1]
    d = tempfile.mkdtemp()
    open(f"{d}/token", "w").write("x" * 40)
    port = 26000 + os.getpid() % 3000
    open(f"{d}/c.toml", "w").write(f'''
[listen]
proxy = "127.0.0.1:{port}"
admin = "127.0.0.1:{port+1}"
[pools]
blue = ["http://127.0.0.1:{up}"]
green = ["http://127.0.0.1:{up}"]
[routing]
state_file = "{d}/route.json"
[admin]
token_file = "{d}/token"
[health]
mode = "off"
[limits]
response_timeout = "60s"
''')
    env = dict(os.environ, TOKIO_WORKER_THREADS="1", RUST_LOG="error",
               _RJEM_MALLOC_CONF="dirty_decay_ms:0,muzzy_decay_ms:0")
    p = subprocess.Popen(["taskset", "-c", "0", binary, "run", "--config", f"{d}/c.toml"], env=env)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port)).close(); break
            except OSError:
                await asyncio.sleep(0.1)
        await asyncio.sleep(1)
        base = rss(p.pid)
        clients = []
        req = (f"GET /v1/listen HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nconnection: Upgrade\r\n"
               "upgrade: websocket\r\nsec-websocket-version: 13\r\n"
               "sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nauthorization: Token abc\r\n\r\n").encode()
        for i in range(n):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(req)
            clients.append(w)
            if i % 200 == 0:
                await asyncio.sleep(0)
        for _ in range(600):
            if accepted >= n:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.5)
        now = rss(p.pid)
        if accepted < n:
            print(f"only {accepted} of {n} handshakes reached the upstream in 60 s: no figure")
            code = 1
        else:
            print(f"{os.path.basename(binary)}: {n} handshakes waiting; RSS {base} -> {now} KiB: {(now - base) / n:.1f} KiB each")
    finally:
        p.kill()
        p.wait()
        shutil.rmtree(d, ignore_errors=True)
        # The held upstream connections go with the process, without a traceback each.
        sys.stdout.flush()
        os._exit(code)
asyncio.run(main())
