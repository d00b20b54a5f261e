from pipeline.control.stage import ControlWorker
from pipeline.worker import main

main(ControlWorker)
