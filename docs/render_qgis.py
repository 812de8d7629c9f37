"""Render search hits over their scene with QGIS itself (headless), for docs/qgis.md.

Runs under Debian's python3 with the QGIS bindings, not the project's venv:

    QT_QPA_PLATFORM=offscreen /usr/bin/python3 docs/render_qgis.py SCENE.tif HITS.gpkg OUT.png

The hits layers get the style geoir embedded in the GeoPackage (QGIS loads it when the layer opens);
nothing is styled here, so the picture shows what a user sees on opening the file.
"""

import os
import sys


def main(scene: str, hits: str, out: str, size: int = 1000) -> None:
    from qgis.core import (
        QgsApplication,
        QgsCoordinateReferenceSystem,
        QgsMapRendererParallelJob,
        QgsMapSettings,
        QgsRasterLayer,
        QgsVectorLayer,
    )
    from qgis.PyQt.QtCore import QSize
    from qgis.PyQt.QtGui import QColor

    app = QgsApplication([], False)
    app.initQgis()
    raster = QgsRasterLayer(scene, "scene")
    merged = QgsVectorLayer(f"{hits}|layername=hits_merged", "hits_merged", "ogr")
    layer = QgsVectorLayer(f"{hits}|layername=hits", "hits", "ogr")
    for lyr in (raster, merged, layer):
        if not lyr.isValid():
            sys.exit(f"QGIS could not open {lyr.name()}")
    settings = QgsMapSettings()
    settings.setLayers([layer, merged, raster])  # top first
    settings.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:4326"))
    extent = raster.extent()
    from qgis.core import QgsCoordinateTransform, QgsProject

    tr = QgsCoordinateTransform(raster.crs(), settings.destinationCrs(), QgsProject.instance())
    extent = tr.transformBoundingBox(extent)
    settings.setExtent(extent)
    ratio = extent.height() / extent.width()
    settings.setOutputSize(QSize(size, int(size * ratio)))
    settings.setBackgroundColor(QColor(255, 255, 255))
    job = QgsMapRendererParallelJob(settings)
    job.start()
    job.waitForFinished()
    job.renderedImage().save(out, "png")
    print(f"rendered {out}: {layer.featureCount()} hits, renderer {layer.renderer().type()}")
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main(*sys.argv[1:4])
