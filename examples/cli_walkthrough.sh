#!/usr/bin/env bash
# geoir from the shell: index two scenes, search three ways, inspect and edit the bundle.
#   $ source .venv/bin/activate     # geoir, and a python3 with geopandas, on PATH
#   $ bash examples/cli_walkthrough.sh SCENE_A.tif SCENE_B.tif
set -euo pipefail
a=$1; b=$2; index=${INDEX:-walkthrough-index}

geoir tile "$a" --index "$index"                       # tile, encode, index
geoir tile "$a" "$b" --index "$index"                  # re-run: a is skipped, b appended
geoir info --index "$index"

# Query with a point (a catalog tile's centre), as GeoJSON on stdout; then with its best hit as tile:ID.
tile_id=$(geoir search --index "$index" --point "$(python3 - "$index" <<'PY'
import sys, geopandas as gpd
t = gpd.read_file(f"{sys.argv[1]}/catalog.gpkg", layer="tiles")
c = t.geometry.iloc[len(t) // 2].centroid
print(f"{c.x},{c.y}")
PY
)" --out - -k 1 | python3 -c "import json,sys; print(json.load(sys.stdin)['features'][0]['properties']['tile_id'])")
geoir search "tile:$tile_id" --index "$index" -k 20 --out hits.gpkg --overwrite
echo "open hits.gpkg in QGIS: layers hits, hits_merged, query"

geoir remove "$(basename "$b")" --index "$index"      # drop a scene again
geoir info --index "$index" --json | python3 -c "import json,sys; print(json.load(sys.stdin)['counts'])"
