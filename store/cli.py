"""``gapcache verify | merge | freeze``: subcommands registered by ``gapcache.cli``.

Usage::

    gapcache verify runs/q25/store.zarr [--json] [--deep] [--allow-incomplete]   # exit 1 on any problem
    gapcache merge runs/a/store.zarr runs/b/store.zarr --out runs/ab/store.zarr
    gapcache freeze runs/ab/store.zarr                                              # read-only from now on
    gapcache migrate runs/old/store.zarr                                            # schema 1 -> current, in place
"""

from __future__ import annotations

import json


def _storage_options(args) -> dict | None:
    raw = getattr(args, "storage_options", None)
    return json.loads(raw) if raw else None


def register(subparsers) -> None:
    so = "JSON fsspec storage_options for URL stores, e.g. '{\"endpoint_url\": \"http://127.0.0.1:9000\"}'"
    v = subparsers.add_parser("verify", help="check a store: schema, completeness, per-shard checksums")
    v.add_argument("store", help="store path or URL (http://, s3://; opened read-only)")
    v.add_argument("--json", action="store_true", help="machine-readable output")
    v.add_argument("--deep", action="store_true", help="also decode every shard through zarr")
    v.add_argument("--allow-incomplete", action="store_true", help="pending samples are a warning, not a problem")
    v.add_argument("--storage-options", help=so)
    v.set_defaults(func=cmd_verify)

    m = subparsers.add_parser("merge", help="combine stores of the same model/prompt template/schema")
    m.add_argument("stores", nargs="+", help="two or more stores (paths or URLs)")
    m.add_argument("--out", required=True, help="the new store (must not exist)")
    m.add_argument("--storage-options", help=so)
    m.set_defaults(func=cmd_merge)

    f = subparsers.add_parser("freeze", help="consolidate metadata and make a finished store read-only")
    f.add_argument("store")
    f.add_argument("--allow-incomplete", action="store_true", help="freeze even with pending samples")
    f.set_defaults(func=cmd_freeze)

    g = subparsers.add_parser("migrate", help="upgrade a store of an older schema version in place (stop writers first)")
    g.add_argument("store")
    g.set_defaults(func=cmd_migrate)


def cmd_verify(args) -> int:
    from gapcache.store.verify import verify

    rep = verify(args.store, _storage_options(args), allow_incomplete=args.allow_incomplete, deep=args.deep)
    print(json.dumps(rep.to_dict(), indent=2) if args.json else rep.format())
    return 0 if rep.ok else 1


def cmd_merge(args) -> int:
    from gapcache.store.merge import merge

    out = merge(args.stores, args.out, _storage_options(args))
    print(f"merged {len(args.stores)} stores into {out}")
    return 0


def cmd_freeze(args) -> int:
    from gapcache.store.verify import freeze

    res = freeze(args.store, allow_incomplete=args.allow_incomplete)
    print(f"frozen {res['path']} ({res['files']} files read-only, at {res['frozen']['at']})")
    return 0


def cmd_migrate(args) -> int:
    from gapcache.store.migrate import migrate

    res = migrate(args.store)
    if res["from"] == res["to"]:
        print(f"{res['path']} is already at schema version {res['to']}; nothing to do")
    else:
        print(f"migrated {res['path']} from schema {res['from']} to {res['to']} ({len(res['arrays'])} arrays rewritten "
              "with checksums)")
    return 0
