"""A real OpenAI-compatible chat-completions server on 127.0.0.1 for the API teacher and judge tests.

It serves the project's tiny embedded model (greedy ``generate`` on the rendered conversation) and, for the judge's
requests, a scripted judge (``judge(prompt, a, b) -> "A" | "B" | "tie" | text``), since a tiny model cannot judge.
Faults are injected by request number: an HTTP status (429 with Retry-After, 500) or a delay past the client's timeout;
``kill`` SIGKILLs a client process once that many answers went out. Every request is logged with its headers.
"""

import json
import os
import re
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

JUDGE_REQUEST = re.compile(r"\[Prompt\]\n(.*)\n\n\[Response A\]\n(.*)\n\n\[Response B\]\n(.*)\n\nReply with", re.DOTALL)


class ChatServer:
    def __init__(self, judge=None, faults=None, delay_s: float = 0.0):
        from pbkd_lightning.models import ModelSpec, load_causal_lm

        torch.manual_seed(0)
        self.model, self.tokenizer = load_causal_lm(ModelSpec(layers=1, hidden=32, heads=2))
        self.model.eval()
        self.judge, self.faults, self.delay_s = judge, dict(faults or {}), delay_s
        self.requests: list[dict] = []  # {"body", "authorization"} of each request, in arrival order
        self.kill_pid, self.kill_after, self._answered = None, None, 0
        self._lock, self._model_lock = threading.Lock(), threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server._lock:
                    server.requests.append({"body": body, "authorization": self.headers.get("Authorization")})
                    number = len(server.requests)
                fault = server.faults.get(number)
                if isinstance(fault, int):
                    self.send_response(fault)
                    if fault == 429:
                        self.send_header("Retry-After", "0.05")
                    self.end_headers()
                    self.wfile.write(b'{"error": {"message": "injected"}}')
                    return
                if fault == "slow":
                    threading.Event().wait(server.delay_s)
                text, finish = server.answer(body)
                reply = {"choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": finish}],
                         "usage": {"completion_tokens": len(text)}}
                data = json.dumps(reply).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout)
                    return
                with server._lock:
                    server._answered += 1
                    if server.kill_pid is not None and server._answered == server.kill_after:
                        os.kill(server.kill_pid, signal.SIGKILL)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def answer(self, body: dict) -> tuple[str, str]:
        last = body["messages"][-1]["content"]
        found = JUDGE_REQUEST.search(last)
        if found and self.judge is not None:
            verdict = self.judge(*found.groups())
            return (f"[[{verdict}]]" if verdict in ("A", "B", "tie") else verdict), "stop"
        prompt = "".join(f"{m['role']}: {m['content']}\n" for m in body["messages"]) + "assistant: "
        limit = int(body.get("max_tokens") or 16)
        ids = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"][:, -64:]
        with self._model_lock, torch.no_grad():
            out = self.model.generate(ids, max_new_tokens=limit, do_sample=False, pad_token_id=self.tokenizer.pad_token_id)
        new = out[0, ids.shape[1]:]
        ended = bool((new == self.tokenizer.eos_token_id).any())
        return self.tokenizer.decode(new, skip_special_tokens=True), "stop" if ended else "length"

    def asked(self) -> list[str]:
        """The last user turn of every request that got an answer (faulted ones left out)."""
        return [r["body"]["messages"][-1]["content"] for n, r in enumerate(self.requests, start=1)
                if not isinstance(self.faults.get(n), int)]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
