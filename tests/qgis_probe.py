"""Open GeoPackage layers in QGIS and report what QGIS sees, as JSON on stdout.

Run by tests under Debian's python3 (which has the QGIS bindings), not the project's venv:

    QT_QPA_PLATFORM=offscreen /usr/bin/python3 tests/qgis_probe.py FILE.gpkg LAYER [LAYER...] [--labels]

With --labels, the layers are also drawn together (the first on top), and each layer's entry lists the labels
QGIS placed, as (text, x, y) with the label's centre in the layer's CRS.
"""

import json
import os
import sys


def main(argv):
    from qgis.core import QgsApplication, QgsPalLayerSettings, QgsRenderContext, QgsVectorLayer

    draw = "--labels" in argv
    argv = [a for a in argv if a != "--labels"]
    path, layers = argv[0], argv[1:]
    app = QgsApplication([], False)
    app.initQgis()
    out = {}
    loaded = []
    for name in layers:
        # A one-layer file (GeoJSON, FlatGeobuf) is opened as it is, as QGIS opens a file dropped on it.
        lyr = QgsVectorLayer(f"{path}|layername={name}" if path.endswith(".gpkg") else path, name, "ogr")
        info = {"valid": lyr.isValid()}
        if lyr.isValid():
            info.update(
                crs=lyr.crs().authid(),
                count=lyr.featureCount(),
                fields=[f.name() for f in lyr.fields()],
                renderer=lyr.renderer().type() if lyr.renderer() else None,
                labels=bool(lyr.labelsEnabled()),
            )
            # QGIS loads a default style from the layer_styles table when the layer is opened.
            _msg, ok = lyr.loadDefaultStyle()
            info["default_style_loaded"] = bool(ok)
            info["renderer_after_style"] = lyr.renderer().type() if lyr.renderer() else None
            renderer = lyr.renderer()
            symbols = renderer.symbols(QgsRenderContext()) if renderer else []
            info["fill_brushes"] = sorted({int(s.symbolLayer(0).brushStyle()) for s in symbols})
            if info["renderer_after_style"] == "singleSymbol":
                info["fill_brush"] = info["fill_brushes"][0]
            info["order_by"] = renderer.orderBy().dump() if renderer and renderer.orderByEnabled() else None
            info["labels_after_style"] = bool(lyr.labelsEnabled())
            if lyr.labelsEnabled():
                settings = lyr.labeling().settings()
                info["label_placement"] = int(settings.placement)
                info["label_centroid_inside"] = bool(settings.centroidInside)
                prop = settings.dataDefinedProperties().property(QgsPalLayerSettings.Priority)
                info["label_priority"] = prop.expressionString() if prop.isActive() else None
            ids = lyr.listStylesInDatabase()[1]
            info["styles_listed"] = len(ids)
            info["styles_distinct"] = len(set(ids))
            loaded.append(lyr)
        out[name] = info
    if draw:
        for name, placed in _placed_labels(loaded).items():
            out[name]["placed_labels"] = placed
    print(json.dumps(out))
    sys.stdout.flush()
    # QgsApplication.exitQgis() crashes on some headless builds; the answer is already printed.
    os._exit(0)


def _placed_labels(layers):
    """Draw the layers (the first on top) over their joint extent; the labels QGIS placed, by layer name."""
    from qgis.core import QgsMapRendererSequentialJob, QgsMapSettings, QgsRectangle
    from qgis.PyQt.QtCore import QSize

    extent = QgsRectangle()
    for lyr in layers:
        extent.combineExtentWith(lyr.extent())
    settings = QgsMapSettings()
    settings.setLayers(layers)
    settings.setDestinationCrs(layers[0].crs())
    settings.setOutputSize(QSize(800, 800))
    settings.setExtent(extent.buffered(extent.width() * 0.05))
    job = QgsMapRendererSequentialJob(settings)
    job.start()
    job.waitForFinished()
    names = {lyr.id(): lyr.name() for lyr in layers}
    placed = {lyr.name(): [] for lyr in layers}
    for pos in job.takeLabelingResults().allLabels():
        if not pos.isUnplaced:
            c = pos.labelRect.center()
            placed[names[pos.layerID]].append((pos.labelText, c.x(), c.y()))
    return placed


if __name__ == "__main__":
    main(sys.argv[1:])
