"""How good generated and reconstructed images are: PSNR, SSIM, the PCA baseline, Fréchet distances and
class accuracy in the features of a classifier trained once per train set."""
