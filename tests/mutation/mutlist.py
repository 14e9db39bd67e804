#!/usr/bin/env python3
"""Reads the mutation list of scripts/mutate.sh (format in mutations.txt).

  mutlist.py LIST ids               the ids, one a line
  mutlist.py LIST show ID FIELD     file | tests | why of one mutation
  mutlist.py LIST apply ID ROOT     applies it to ROOT/file in place;
                                    exit 3 when the original text is not
                                    there exactly once (the record is stale)
"""
import sys


def parse(path):
    muts, cur, block = [], None, None
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for line in lines:
        if line.startswith("=== "):
            cur = {"id": line[4:].strip(), "original": [], "mutated": []}
            muts.append(cur)
            block = None
        elif cur is not None and line == "--- original":
            block = "original"
        elif cur is not None and line == "+++ mutated":
            block = "mutated"
        elif cur is not None and block:
            cur[block].append(line)
        elif cur is not None and ":" in line and not line.startswith("#"):
            # a "key: value" field of the record's header
            key, _, val = line.partition(":")
            cur[key.strip()] = val.strip()
    for m in muts:
        for k in ("original", "mutated"):
            while m[k] and m[k][-1] == "":
                m[k].pop()
            m[k] = "\n".join(m[k])
        if "file" not in m or not m["original"]:
            sys.exit("%s: mutation %s needs file: and --- original" % (path, m["id"]))
    return muts


def main():
    muts = parse(sys.argv[1])
    cmd = sys.argv[2]
    if cmd == "ids":
        for m in muts:
            print(m["id"])
        return 0
    by_id = {m["id"]: m for m in muts}
    m = by_id.get(sys.argv[3])
    if m is None:
        sys.exit("no mutation %s in %s" % (sys.argv[3], sys.argv[1]))
    if cmd == "show":
        print(m.get(sys.argv[4], ""))
        return 0
    if cmd == "apply":
        path = sys.argv[4] + "/" + m["file"]
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if text.count(m["original"]) != 1:
            return 3
        with open(path, "w", encoding="utf-8") as f:
            f.write(text.replace(m["original"], m["mutated"]))
        return 0
    sys.exit("unknown command " + cmd)


if __name__ == "__main__":
    sys.exit(main())
