from pipeline.classifier.stage import ClassifierWorker
from pipeline.worker import main

main(ClassifierWorker)
