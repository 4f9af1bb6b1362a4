"""The figures the docs quote, one module per page (or pair of pages quoting the same results), each a list
FIGURES of tests/doc_figures/common.py's Figure; tests/test_doc_figures.py checks them all."""
