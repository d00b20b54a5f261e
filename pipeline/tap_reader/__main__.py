from pipeline.tap_reader.stage import TapReaderWorker
from pipeline.worker import main

main(TapReaderWorker)
