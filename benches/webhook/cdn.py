"""A loopback stand-in for a Varnish BAN endpoint: logs when each purge arrives (for webhook_to_cdn.sh)."""
import http.server, time, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_BAN(self):
        with open(sys.argv[1], "a") as f: f.write("%f %s\n" % (time.time(), self.headers.get("xkey")))
        self.send_response(200); self.send_header("content-length", "0"); self.end_headers()
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[2])), H).serve_forever()
