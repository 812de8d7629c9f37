"""Open GeoPackage layers in QGIS and report what QGIS sees, as JSON on stdout.

Run by tests under Debian's python3 (which has the QGIS bindings), not the project's venv:

    QT_QPA_PLATFORM=offscreen /usr/bin/python3 tests/qgis_probe.py FILE.gpkg LAYER [LAYER...] [--render OUT.png]
"""

import json
import os
import sys


def main(argv):
    from qgis.core import QgsApplication, QgsVectorLayer

    if "--render" in argv:
        i = argv.index("--render")
        argv[i + 1]
        argv = argv[:i] + argv[i + 2 :]
    path, layers = argv[0], argv[1:]
    app = QgsApplication([], False)
    app.initQgis()
    out = {}
    loaded = []
    for name in layers:
        lyr = QgsVectorLayer(f"{path}|layername={name}", name, "ogr")
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
            if info["renderer_after_style"] == "singleSymbol":
                fill = lyr.renderer().symbol().symbolLayer(0)
                info["fill_brush"] = int(fill.brushStyle()) if hasattr(fill, "brushStyle") else None
            loaded.append(lyr)
        out[name] = info
    print(json.dumps(out))
    sys.stdout.flush()
    # QgsApplication.exitQgis() crashes on some headless builds; the answer is already printed.
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
