"""Submit the demo's NVFlare job through the admin kit and wait for it (runs in the role image).

Usage: python admin_job.py ADMIN_EMAIL ADMIN_KIT_DIR JOB_DIR TIMEOUT_S
Prints one JSON object per line: progress events, then {"event": "done", ...}.
"""

import json
import sys
import time

from nvflare.fuel.flare_api.flare_api import new_secure_session


def say(**kw):
    print(json.dumps(kw), flush=True)


def main():
    email, kit, job_dir, timeout = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    deadline = time.monotonic() + timeout
    sess = new_secure_session(email, kit, timeout=60)
    try:
        # Wait until both clients have registered with the server.
        while True:
            info = sess.get_system_info()
            clients = sorted(c.name for c in info.client_info)
            say(event="clients", clients=clients)
            if len(clients) >= 2:
                break
            if time.monotonic() > deadline:
                say(event="done", status="TIMEOUT waiting for clients", clients=clients)
                return 1
            time.sleep(3)
        job_id = sess.submit_job(job_dir)
        say(event="submitted", job_id=job_id)
        last = None
        while time.monotonic() < deadline:
            meta = sess.get_job_meta(job_id)
            status = meta.get("status")
            if status != last:
                say(event="status", job_id=job_id, status=status)
                last = status
            if status and status.startswith("FINISHED"):
                say(event="done", job_id=job_id, status=status)
                return 0 if status == "FINISHED:COMPLETED" else 1
            time.sleep(3)
        say(event="done", job_id=job_id, status=f"TIMEOUT ({last})")
        return 1
    finally:
        sess.close()


if __name__ == "__main__":
    sys.exit(main())
