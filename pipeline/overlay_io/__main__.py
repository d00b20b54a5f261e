from pipeline.overlay_io.stage import OverlayIoWorker
from pipeline.worker import main

main(OverlayIoWorker)
