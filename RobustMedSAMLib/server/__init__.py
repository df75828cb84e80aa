"""The inference server (``robustmedsam serve``) and its torch-free client (``client``)."""
