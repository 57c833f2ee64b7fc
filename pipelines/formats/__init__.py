"""On-disk formats, one module each: the face dataset, the gallery, the checkpoint.

Each owns its schema, version, reader and writer and depends only on storage/ and model/.
"""
