"""Library conventions (timm, mmpretrain, ultralytics, ...): one small file per library."""
