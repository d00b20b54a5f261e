from pipeline.lazy import defer_unused

defer_unused()
