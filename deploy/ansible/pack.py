#!/usr/bin/env python3
"""pack.py REPO OUT.tar: the files deploy/install.sh needs, as one tar that install.yml unpacks on each host.

Run on the control node by install.yml. The tar holds smart.py, DEPLOYMENT.md, www/, experiments/
and deploy/ without deploy/ansible/, with files in name order, owner root and each file's own mode
and mtime. The same files give the same bytes, so OUT.tar is rewritten only when something changed.
It prints "changed" or "unchanged". Standard library only.
"""

import io
import os
import sys
import tarfile

TOP = ("smart.py", "DEPLOYMENT.md", "www", "experiments", "deploy")
SKIP = {os.path.join("deploy", "ansible"), "__pycache__", ".git"}


def members(repo):
    for top in TOP:
        path = os.path.join(repo, top)
        if os.path.isfile(path):
            yield top
            continue
        for folder, dirs, files in os.walk(path):
            rel = os.path.relpath(folder, repo)
            dirs[:] = sorted(d for d in dirs if d not in SKIP and os.path.join(rel, d) not in SKIP)
            yield rel
            for name in sorted(files):
                if not name.endswith((".pyc", "~")):
                    yield os.path.join(rel, name)


def pack(repo) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for rel in members(repo):
            info = tar.gettarinfo(os.path.join(repo, rel), arcname=rel)
            if not (info.isfile() or info.isdir()):
                continue                       # no symlinks or devices in what is shipped
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mode &= 0o755 if info.mode & 0o100 or info.isdir() else 0o644
            if info.isfile():
                with open(os.path.join(repo, rel), "rb") as handle:
                    tar.addfile(info, handle)
            else:
                tar.addfile(info)
    return buffer.getvalue()


def main(argv):
    if len(argv) != 3:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        return 2
    repo, out = argv[1], argv[2]
    if not os.path.isfile(os.path.join(repo, "smart.py")):
        print(f"pack.py: {repo} has no smart.py: not the smart.py repository", file=sys.stderr)
        return 2
    data = pack(repo)
    try:
        with open(out, "rb") as handle:
            if handle.read() == data:
                print("unchanged")
                return 0
    except FileNotFoundError:
        pass
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    temp = f"{out}.{os.getpid()}.tmp"
    with open(temp, "wb") as handle:
        handle.write(data)
    os.replace(temp, out)
    print("changed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
