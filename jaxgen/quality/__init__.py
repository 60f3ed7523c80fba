"""How good generated outputs are, beside trivial baselines: for images PSNR, SSIM, the PCA baseline,
Fréchet distances and class accuracy in the features of a classifier trained once per train set; for
text, edit-distance error rates and the nearest-input baseline of supervised pairs."""
