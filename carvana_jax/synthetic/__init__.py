"""Synthetic data in the exact Kaggle Carvana layout, for tests and for trying the pipeline offline.

``python -m carvana_jax.synthetic --out DIR --cars N`` writes what the unzipped Kaggle download
holds::

    DIR/train/{id}_{NN}.jpg                 RGB JPEG, 1918 wide x 1280 high, NN = 01..16
    DIR/train_masks/{id}_{NN}_mask.gif      palette GIF, index 1 = car, 0 = background
    DIR/train_masks.csv                     img,rle_mask   (rle of each GIF, carvana_jax.rle)
    DIR/test/{id}_{NN}.jpg                  test cars (other ids), no masks
    DIR/sample_submission.csv               img,rle_mask   (every test image, rle "1 1")
    DIR/metadata.csv                        id,year,make,model,trim1,trim2

Each car is a small 3D model (a lofted lower body with wheel arches, a greenhouse with glass,
wheels with rims, mirrors, lights) photographed on a turntable in a white studio from 16 angles
22.5 degrees apart (01 = front, 09 = rear). The studio has a wall-to-floor gradient and a soft
shadow under the car that is not part of the mask; about a third of the cars are white, silver or
light grey, so a model must learn shapes rather than threshold a colour. The mask is rasterised
from the same polygons as the photo, so it is exact.

Everything is written into ``DIR.tmp-XXXX`` first and renamed to DIR at the end, so an interrupted
run never leaves something that looks complete. Output depends only on the seed (each car has its
own seed), not on the number of worker processes.
"""
