"""Build the QGIS styles geoir embeds in its GeoPackages (geoir/output/styles/*.qml but query.qml) with QGIS.

Runs under Debian's python3 with the QGIS bindings, not the project's venv:

    QT_QPA_PLATFORM=offscreen /usr/bin/python3 docs/make_styles.py geoir/output/styles

The styles are made through QGIS' own API and exported as QGIS writes them, so they load in the QGIS that made
them (3.22 here) and in later ones. query.qml is small and written by hand.

- hits: graduated by rank (rank 1, 2-3, 4-10, 11-25, 26+), translucent fill; rank 1 drawn last (on top); the
  rank as a label over the footprint's centre, kept inside it, better ranks winning where labels collide (two
  dates of one place give identical footprints, and their ranks must not run together into one number).
- hits_merged: the regions as outlines only (no fill: drawn with the hits it would tint the imagery twice),
  coloured by best rank, unlabelled (the hits layer labels the ranks).
- catalog_tiles, catalog_scenes: a bundle's catalog.gpkg layers as outlines (QGIS' default random fill hides
  the imagery), scenes labelled with their file name.
"""

import os
import sys
from pathlib import Path

CLASSES = [  # (lower, upper, label, rgb)
    (0.5, 1.5, "rank 1", "215,25,28"),
    (1.5, 3.5, "rank 2-3", "244,109,67"),
    (3.5, 10.5, "rank 4-10", "253,174,97"),
    (10.5, 25.5, "rank 11-25", "254,224,139"),
    (25.5, 1000000.5, "rank 26+", "255,255,191"),
]
#: Label priority (0-10, higher wins a collision) from the rank: 10 for rank 1, about 4 for rank 10, 0 past 50.
PRIORITY = 'max(0, 10 - 2.5 * ln("rank"))'


def renderer(field: str, filled: bool):
    from qgis.core import (
        QgsFeatureRequest,
        QgsFillSymbol,
        QgsGraduatedSymbolRenderer,
        QgsRendererRange,
    )

    ranges = []
    for lower, upper, label, rgb in CLASSES:
        symbol = QgsFillSymbol.createSimple(
            {
                "color": f"{rgb},90",
                "style": "solid" if filled else "no",
                "outline_color": f"{rgb},255",
                "outline_width": "0.8" if filled else "1.2",
                "outline_width_unit": "MM",
                "joinstyle": "miter",
            }
        )
        ranges.append(QgsRendererRange(lower, upper, symbol, label.replace("rank", field.replace("_", " "), 1)))
    r = QgsGraduatedSymbolRenderer(field, ranges)
    # Features are drawn in this order, so the worst rank goes first and rank 1 ends on top.
    r.setOrderBy(QgsFeatureRequest.OrderBy([QgsFeatureRequest.OrderByClause(f'"{field}"', False)]))
    r.setOrderByEnabled(True)
    return r


def text_format(size: float, color: tuple[int, int, int], halo: tuple[int, int, int], halo_mm: float):
    """DejaVu Sans of ``size`` points in ``color``, with a ``halo`` of ``halo_mm`` around it."""
    from qgis.core import QgsTextBufferSettings, QgsTextFormat
    from qgis.PyQt.QtGui import QColor, QFont

    fmt = QgsTextFormat()
    fmt.setFont(QFont("DejaVu Sans"))
    fmt.setSize(size)
    fmt.setColor(QColor(*color))
    buffer = QgsTextBufferSettings()
    buffer.setEnabled(True)
    buffer.setSize(halo_mm)
    buffer.setColor(QColor(*halo))
    fmt.setBuffer(buffer)
    return fmt


def rank_labels():
    from qgis.core import QgsPalLayerSettings, QgsProperty, QgsVectorLayerSimpleLabeling

    s = QgsPalLayerSettings()
    s.fieldName = "rank"
    s.setFormat(text_format(10, (0, 0, 0), (255, 255, 255), 1))
    s.placement = QgsPalLayerSettings.OverPoint
    # Over the centroid, or over a point inside the footprint where the centroid falls outside it.
    s.centroidInside = True
    s.dataDefinedProperties().setProperty(QgsPalLayerSettings.Priority, QgsProperty.fromExpression(PRIORITY))
    return QgsVectorLayerSimpleLabeling(s)


def outline(rgb: str, width: float):
    from qgis.core import QgsFillSymbol, QgsSingleSymbolRenderer

    symbol = QgsFillSymbol.createSimple(
        {"style": "no", "outline_color": f"{rgb},255", "outline_width": str(width), "outline_width_unit": "MM"}
    )
    return QgsSingleSymbolRenderer(symbol)


def file_name_labels():
    from qgis.core import QgsPalLayerSettings, QgsVectorLayerSimpleLabeling

    s = QgsPalLayerSettings()
    s.fieldName = 'file_name("path")'  # QGIS >= 3.18
    s.isExpression = True
    s.setFormat(text_format(9, (255, 255, 0), (0, 0, 0), 0.8))
    s.placement = QgsPalLayerSettings.Horizontal  # inside the outline
    return QgsVectorLayerSimpleLabeling(s)


def export(layer, path: Path) -> None:
    from qgis.core import QgsMapLayer, QgsReadWriteContext
    from qgis.PyQt.QtXml import QDomDocument

    doc = QDomDocument()
    categories = QgsMapLayer.Symbology | QgsMapLayer.Labeling | QgsMapLayer.Rendering
    error = layer.exportNamedStyle(doc, QgsReadWriteContext(), categories)
    if error:
        sys.exit(f"QGIS could not export {path.name}: {error}")
    path.write_text(doc.toString(1))
    print(f"wrote {path}")


def main(folder: str) -> None:
    os.environ["QT_HASH_SEED"] = "0"  # the same attribute order on every run, so the files diff cleanly
    from qgis.core import QgsApplication, QgsVectorLayer

    app = QgsApplication([], False)
    app.initQgis()
    out = Path(folder)
    hits = QgsVectorLayer("Polygon?crs=EPSG:4326&field=rank:integer", "hits", "memory")
    hits.setRenderer(renderer("rank", filled=True))
    hits.setLabeling(rank_labels())
    hits.setLabelsEnabled(True)
    export(hits, out / "hits.qml")
    merged = QgsVectorLayer("Polygon?crs=EPSG:4326&field=best_rank:integer", "hits_merged", "memory")
    merged.setRenderer(renderer("best_rank", filled=False))
    merged.setLabelsEnabled(False)
    export(merged, out / "merged.qml")
    tiles = QgsVectorLayer("Polygon?crs=EPSG:4326&field=tile_id:long", "tiles", "memory")
    tiles.setRenderer(outline("255,255,255", 0.2))
    tiles.setLabelsEnabled(False)
    export(tiles, out / "catalog_tiles.qml")
    scenes = QgsVectorLayer("Polygon?crs=EPSG:4326&field=path:string", "scenes", "memory")
    scenes.setRenderer(outline("255,255,0", 0.8))
    scenes.setLabeling(file_name_labels())
    scenes.setLabelsEnabled(True)
    export(scenes, out / "catalog_scenes.qml")
    sys.stdout.flush()
    del app
    os._exit(0)  # QgsApplication.exitQgis() crashes on some headless builds


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).resolve().parents[1] / "geoir/output/styles"))
